"""The engine: chunked prefill equals one unchunked pass (docs/graph-contract.md), the KV cache it
fills gives the right next-token logits, and KV-cached greedy decoding equals a full recompute
(rung 5 of the verification ladder). References are transformers' Qwen2ForCausalLM in fp32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qwen_ondevice.core.checkpoint import load_checkpoint
from qwen_ondevice.core.errors import UserError
from qwen_ondevice.runtime.backends.torch_backend import TorchBackend
from qwen_ondevice.runtime.engine import Engine
from qwen_ondevice.runtime.generate import generate
from qwen_ondevice.runtime.sampling import SamplingParams

TINY_TOL = 1e-4
DEMO_TOL = 1e-3


def hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def check_chunked(engine: Engine, ids: list[int], ref: np.ndarray, n: int, tol: float) -> None:
    """Prompt ``ids[:n]`` through the engine in AR chunks against the unchunked reference ``ref``
    (logits of ``ids`` in one causal pass, so ``ref[:n]`` is the pass over ``ids[:n]``)."""
    # every position of the chunked pass
    ours = engine.logits_all(ids[:n])
    assert ours.shape == (n, ref.shape[1])
    err = np.abs(ours - ref[:n]).max()
    assert err < tol, f"n={n}: max abs logit difference {err:.3g}"
    np.testing.assert_array_equal(ours.argmax(-1), ref[:n].argmax(-1))
    # the generation path: prefill from an empty cache, then one more token through the AR-1
    # graph, which sees only what the chunks wrote into the KV cache (pads must not leak in)
    engine.reset()
    last = engine.prefill(ids[:n])
    assert np.abs(last - ref[n - 1]).max() < tol
    nxt = engine.feed([ids[n]])
    assert np.abs(nxt - ref[n]).max() < tol, f"n={n}: next-token logits after the chunked prefill differ"
    assert engine.tokens == ids[: n + 1]


DEMO_LENGTHS = [127, 128, 129, 255, 256, 257]


@pytest.fixture(scope="module")
def demo_engine(demo_checkpoint):
    return Engine(TorchBackend(demo_checkpoint, context_length=512), prompt_length=128)


@pytest.fixture(scope="module")
def demo_ref(demo_hf_model, text_ids):
    """transformers' logits of one unchunked pass over 258 real-text tokens."""
    return hf_logits(demo_hf_model, text_ids[:258])


@pytest.mark.demo
@pytest.mark.parametrize("n", DEMO_LENGTHS)
def test_demo_chunked_prefill_equals_single_pass(demo_engine, demo_ref, text_ids, n):
    check_chunked(demo_engine, text_ids[:258], demo_ref, n, DEMO_TOL)


TINY_AR = 8
TINY_LENGTHS = [1, 2, 7, 8, 9, 15, 16, 17, 23, 24, 25, 40]


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_chunked_prefill_equals_single_pass(tiny_factory, text_ids, tied):
    ckpt = load_checkpoint(tiny_factory(tied=tied))
    ids = text_ids[:41]
    ref = hf_logits(ckpt.load_transformers_model(), ids)
    engine = Engine(TorchBackend(ckpt, context_length=64), prompt_length=TINY_AR)
    for n in TINY_LENGTHS:
        check_chunked(engine, ids, ref, n, TINY_TOL)


def test_tiny_full_context(tiny_factory, text_ids):
    """A sequence may fill the context exactly (CL tokens); the next token is a clear error."""
    ckpt = load_checkpoint(tiny_factory())
    ids = text_ids[:32]
    ref = hf_logits(ckpt.load_transformers_model(), ids)
    engine = Engine(TorchBackend(ckpt, context_length=32), prompt_length=8)
    last = engine.prefill(ids[:31])  # the longest prompt: CL - 1 tokens
    assert np.abs(last - ref[30]).max() < TINY_TOL
    out = engine.feed([ids[31]])  # the CL-th token
    assert np.abs(out - ref[31]).max() < TINY_TOL
    with pytest.raises(UserError, match="over the context length"):
        engine.feed([ids[0]])
    with pytest.raises(UserError, match="context length"):
        engine.prefill(ids)  # a prompt of CL tokens leaves no room to generate
    # and a whole chunk that ends exactly at CL
    engine.reset()
    engine.prefill(ids[:24])
    out = engine.feed(ids[24:32])
    assert np.abs(out - ref[31]).max() < TINY_TOL


def test_prefill_reuses_common_prefix(tiny_factory, text_ids):
    """A second prompt that extends the first (a chat turn) gives the same logits as a fresh pass."""
    ckpt = load_checkpoint(tiny_factory())
    ids = text_ids[:50]
    ref = hf_logits(ckpt.load_transformers_model(), ids)
    engine = Engine(TorchBackend(ckpt, context_length=64), prompt_length=8)
    engine.prefill(ids[:20])
    engine.feed(ids[20:23])
    out = engine.prefill(ids[:50])
    assert np.abs(out - ref[49]).max() < TINY_TOL
    # a prompt that diverges from the cached sequence recomputes from the divergence
    other = ids[:10] + text_ids[100:120]
    ref2 = hf_logits(ckpt.load_transformers_model(), other)
    out = engine.prefill(other)
    assert np.abs(out - ref2[-1]).max() < TINY_TOL


def test_a_prompt_tail_goes_through_the_smallest_graph_that_holds_it(tiny_factory, text_ids):
    """With a verify graph beside the prompt processor, a prompt's tail runs through the smallest
    graph that holds it, as Genie runs it (its log on the simulator, a part with AR-8, AR-5 and
    AR-1 graphs: 3 and 5 tokens through AR-5, 7 through AR-8, 13 through AR-8 then AR-5), and
    the logits still equal transformers'."""

    class ThreeGraphs(TorchBackend):
        ar_lengths = (1, 5, 8)

    ckpt = load_checkpoint(tiny_factory())
    ids = text_ids[:62]
    ref = hf_logits(ckpt.load_transformers_model(), ids)
    engine = Engine(ThreeGraphs(ckpt, context_length=64), prompt_length=8)
    assert [engine.prompt_ars(n) for n in (3, 5, 7, 13)] == [[5], [5], [8], [8, 5]]
    assert engine.prompt_ars(61) == [8] * 7 + [5]  # the last chunk starts at n_past 56 = CL - AR
    assert Engine(TorchBackend(ckpt, context_length=64), prompt_length=8).prompt_ars(13) == [8, 8]
    for n in (3, 13, 61):
        check_chunked(engine, ids, ref, n, TINY_TOL)


def greedy_full_recompute(model, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding without a KV cache: a full transformers forward over the whole sequence
    at every step, argmax of the last position."""
    seq = list(prompt)
    out = []
    for _ in range(steps):
        tok = int(hf_logits(model, seq)[-1].argmax())
        out.append(tok)
        seq.append(tok)
    return out


@pytest.mark.parametrize("tied,ar", [(False, 4), (True, 16)])
def test_kv_cached_greedy_equals_full_recompute(tiny_factory, text_ids, tied, ar):
    ckpt = load_checkpoint(tiny_factory(tied=tied))
    prompt = text_ids[:13]
    steps = 50
    ref = greedy_full_recompute(ckpt.load_transformers_model(), prompt, steps)
    assert len(set(ref)) > 5  # a real sequence, not one token repeated

    engine = Engine(TorchBackend(ckpt, context_length=64), prompt_length=ar)
    # the engine by hand: chunked prefill, then one token at a time through the AR-1 graph
    logits = engine.prefill(prompt)
    ours = []
    for _ in range(steps):
        tok = int(np.argmax(logits))
        ours.append(tok)
        logits = engine.feed([tok])
    assert ours == ref

    # the generation loop (sampler at temperature 0, stop handling, detokenizer) gives the same
    tok = ckpt.load_tokenizer()
    assert not set(ref) & set(tok.stop_ids)
    res = generate(engine, tok, prompt, SamplingParams(temperature=0.0), max_new_tokens=steps)
    assert res.token_ids == ref
    assert res.finish_reason == "length"
    from transformers import AutoTokenizer

    assert res.text == AutoTokenizer.from_pretrained(str(ckpt.path)).decode(ref, skip_special_tokens=True)
