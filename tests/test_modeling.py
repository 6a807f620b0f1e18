"""Rung 1 of the verification ladder: the adapted on-device graph (torch backend, driven by the
engine in AR-sized chunks against a CL context) against ``transformers``' ``Qwen2ForCausalLM``
in fp32, full-forward logits at every position."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qwen_ondevice.core.checkpoint import load_checkpoint
from qwen_ondevice.runtime.backends.torch_backend import TorchBackend
from qwen_ondevice.runtime.engine import Engine

TINY_TOL = 1e-4  # max abs logit difference, fp32 vs fp32, tiny random models
DEMO_TOL = 1e-3  # the same on the 24-layer demo model


def hf_logits(model, ids: list[int]) -> np.ndarray:
    """transformers' logits (n, V) of one full forward pass over ``ids``."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


# (tiny checkpoint kwargs, AR, CL, prompt length). Heads/KV heads cover GQA (4/2, 8/2), MQA (4/1)
# and plain MHA (4/4); prompt lengths end inside a chunk, on a chunk boundary, and run into the
# last CL - AR positions where the engine switches to AR-1 calls (n = CL fills the context).
TINY_CASES = [
    (dict(tied=False, heads=4, kv_heads=2), 4, 32, 32),
    (dict(tied=True, heads=4, kv_heads=2), 4, 32, 30),
    (dict(tied=False, heads=4, kv_heads=1, rope_theta=1e6), 16, 64, 57),
    (dict(tied=True, heads=8, kv_heads=2, layers=2), 16, 64, 64),
    (dict(tied=False, heads=4, kv_heads=4), 16, 64, 48),
    (dict(tied=False, heads=4, kv_heads=2), 128, 256, 200),
    (dict(tied=True, heads=4, kv_heads=1, rope_theta=1e6), 128, 256, 256),
]


@pytest.mark.parametrize("kw,ar,cl,n", TINY_CASES, ids=lambda x: str(x) if not isinstance(x, dict) else
                         "-".join(f"{k}{v}" for k, v in x.items()))
def test_tiny_graph_matches_transformers(tiny_factory, text_ids, kw, ar, cl, n):
    ckpt = load_checkpoint(tiny_factory(**kw))
    hf = ckpt.load_transformers_model()
    assert hf.config.tie_word_embeddings == kw["tied"]
    lm_head = hf.lm_head.weight.detach()
    embed = hf.model.embed_tokens.weight.detach()
    # the checkpoint really is tied / untied (so both weight-loading paths are exercised)
    assert torch.equal(lm_head, embed) == kw["tied"]
    assert hf.config.num_key_value_heads == kw["kv_heads"]

    ids = text_ids[:n]
    ref = hf_logits(hf, ids)
    ours = Engine(TorchBackend(ckpt, context_length=cl), prompt_length=ar).logits_all(ids)
    assert ours.shape == ref.shape == (n, ckpt.config.vocab_size)
    assert np.abs(ref).max() > 1.0  # the logits are not trivially small
    err = np.abs(ours - ref).max()
    assert err < TINY_TOL, f"max abs logit difference {err:.3g}"
    # the streamed float reference (one layer at a time, lm_head in row blocks) computes the same
    streamed = Engine(TorchBackend(ckpt, context_length=cl, stream=True), prompt_length=ar).logits_all(ids)
    err = np.abs(streamed - ref).max()
    assert err < TINY_TOL, f"streamed: max abs logit difference {err:.3g}"


def test_tolerance_detects_bf16_rounding(tiny_factory, text_ids):
    """The fp32 tolerance means something, and the backend's dtype is honoured: a bf16 torch
    backend is close to transformers' fp32 logits but misses the fp32 tolerance."""
    ckpt = load_checkpoint(tiny_factory())
    ids = text_ids[:40]
    ref = hf_logits(ckpt.load_transformers_model(), ids)
    ours = Engine(TorchBackend(ckpt, context_length=64, dtype=torch.bfloat16), prompt_length=16).logits_all(ids)
    err = np.abs(ours - ref).max()
    assert TINY_TOL < err < 0.5, err


@pytest.mark.demo
def test_demo_graph_matches_transformers(demo_checkpoint, demo_hf_model, text_ids):
    """The real 24-layer model on a 40-token prompt: same top-1 everywhere, logits within 1e-3."""
    ids = text_ids[:40]
    ref = hf_logits(demo_hf_model, ids)
    ours = Engine(TorchBackend(demo_checkpoint, context_length=512), prompt_length=128).logits_all(ids)
    assert ours.shape == ref.shape == (40, 151936)
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))
    err = np.abs(ours - ref).max()
    assert err < DEMO_TOL, f"max abs logit difference {err:.3g}"


@pytest.mark.parametrize("tied", [False, True])
def test_parameter_count_equals_transformers(tiny_factory, tied):
    from transformers import Qwen2ForCausalLM

    from qwen_ondevice.core.checkpoint import load_checkpoint

    path = tiny_factory(tied=tied)
    hf = Qwen2ForCausalLM.from_pretrained(path)
    assert load_checkpoint(path).config.parameter_count() == hf.num_parameters()
