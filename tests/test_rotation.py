"""The residual-stream rotation (quantize/rotation.py) is exact in float: transformers' own logits
of the rotated checkpoint equal those of the original, and the rotated weights are new."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qwen_ondevice.quantize.rotation import head_rotation, random_orthogonal, rotate_checkpoint


def test_random_orthogonal_is_orthogonal_and_seeded():
    q = random_orthogonal(64, seed=3)
    np.testing.assert_allclose(q @ q.T, np.eye(64), atol=1e-12)
    np.testing.assert_array_equal(q, random_orthogonal(64, seed=3))
    assert not np.allclose(q, random_orthogonal(64, seed=4))


@pytest.mark.parametrize("d", [64, 128, 6])
def test_head_rotation_is_orthogonal(d):
    r = head_rotation(d, seed=0)
    np.testing.assert_allclose(r @ r.T, np.eye(d), atol=1e-12)
    if d in (64, 128):  # Hadamard: every entry +-1/sqrt(d)
        np.testing.assert_allclose(np.abs(r), 1 / np.sqrt(d), rtol=1e-12)


@pytest.mark.parametrize("tied", [False, True])
def test_rotated_checkpoint_computes_the_same_logits(tmp_path, tiny_factory, tied):
    from transformers import Qwen2ForCausalLM

    src = tiny_factory(tied=tied)
    dst = rotate_checkpoint(src, tmp_path / "rotated", seed=0)
    a = Qwen2ForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    b = Qwen2ForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    ids = torch.tensor([[151644, 872, 198, 9707, 11, 1879, 0, 151645, 198, 3838, 374, 220, 17, 10, 17, 30]])
    with torch.no_grad():
        la, lb = a(ids).logits, b(ids).logits
        ha = a(ids, output_hidden_states=True).hidden_states[2]
        hb = b(ids, output_hidden_states=True).hidden_states[2]
    # float32 rounding of products over H = 64 terms, logits of order 1-10
    assert torch.allclose(la, lb, atol=1e-4, rtol=1e-4), (la - lb).abs().max()
    assert torch.equal(la.argmax(-1), lb.argmax(-1))
    # the residual stream itself is rotated, not equal
    q = torch.from_numpy(random_orthogonal(ha.shape[-1], seed=0)).float()
    assert torch.allclose(ha @ q, hb, atol=1e-4)
    assert not torch.allclose(ha, hb, atol=1e-2)
    w_a = a.model.layers[0].mlp.down_proj.weight
    w_b = b.model.layers[0].mlp.down_proj.weight
    assert not torch.allclose(w_a, w_b, atol=1e-3)
    assert torch.equal(b.model.norm.weight, torch.ones_like(b.model.norm.weight))
    assert b.config.tie_word_embeddings is False


def test_rotate_refuses_a_non_empty_destination(tmp_path, tiny_path):
    from qwen_ondevice.core.errors import UserError

    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("keep")
    with pytest.raises(UserError, match="not empty"):
        rotate_checkpoint(tiny_path, tmp_path / "x", seed=0)
    assert (tmp_path / "x" / "f").read_text() == "keep"


@pytest.mark.parametrize("tied", [False, True])
def test_export_rotate_is_exact_in_float(tmp_path, tiny_factory, tied):
    """``export --rotate`` (and ``--rotate-heads`` on top): the fp32 bundle of the rotated weights
    computes transformers' logits of the original checkpoint (float32 rounding), while its graphs
    hold other weights."""
    import onnx
    from transformers import Qwen2ForCausalLM

    from qwen_ondevice.core.onnx_data import read_initializer
    from qwen_ondevice.export.options import ExportOptions
    from qwen_ondevice.export.pipeline import export
    from qwen_ondevice.runtime.open_model import open_runtime

    src = tiny_factory(tied=tied)
    outs = {}
    for rotate, heads in ((False, False), (True, False), (True, True)):
        outs[rotate, heads] = tmp_path / f"r{rotate}{heads}"
        export(ExportOptions(model=str(src), precision="fp32", prompt_length=8, context_length=64, num_parts=2,
                             eval_tokens=0, rotate=rotate, rotate_heads=heads), outs[rotate, heads])
    ids = [151644, 872, 198, 9707, 11, 1879, 0, 151645, 198, 3838, 374, 220, 17, 10, 17, 30, 5, 9, 1000]
    hf = Qwen2ForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    for key in ((True, False), (True, True)):
        got = open_runtime(str(outs[key])).engine.logits_all(ids)
        np.testing.assert_allclose(got, ref, atol=2e-4, rtol=1e-4)

    def weight(out, kind):
        path = out / "onnx" / "part_2_of_2.ar8.onnx"
        m = onnx.load(str(path), load_external_data=False)
        t = next(t for t in m.graph.initializer if kind in t.name and t.name.endswith("weight"))
        return read_initializer(t, path.parent)

    assert not np.allclose(weight(outs[True, False], "down_proj"), weight(outs[False, False], "down_proj"), atol=1e-3)
    # the heads' rotation moves v_proj and o_proj, and leaves the other projections as they were
    for kind in ("v_proj", "o_proj"):
        assert not np.allclose(weight(outs[True, True], kind), weight(outs[True, False], kind), atol=1e-3)
    np.testing.assert_array_equal(weight(outs[True, True], "q_proj"), weight(outs[True, False], "q_proj"))
    assert json.loads((outs[True, True] / "manifest.json").read_text())["quantization"] is None  # fp32: no quantization block


def test_rotation_is_on_by_default_at_w4a16_only():
    """The default export rotates at w4a16 (ROTATE_BY_DEFAULT), not at the other precisions;
    ``--no-rotate`` / ``--rotate`` override it, and the option is resolved to a bool so a resumed
    export compares what was done."""
    from qwen_ondevice.cli.main import build_parser
    from qwen_ondevice.export.options import ExportOptions

    assert ExportOptions(model="demo").rotate is True
    assert ExportOptions(model="demo", precision="w8a16").rotate is False
    assert ExportOptions(model="demo", precision="fp32").rotate is False
    assert ExportOptions(model="demo", rotate=False).rotate is False
    assert ExportOptions(model="demo", precision="w8a16", rotate=True).rotate is True
    parse = build_parser().parse_args
    assert parse(["export", "demo", "--out", "x"]).rotate is None
    assert parse(["export", "demo", "--out", "x", "--no-rotate"]).rotate is False
    assert parse(["export", "demo", "--out", "x", "--rotate"]).rotate is True
    assert ExportOptions(model="demo").rotate_heads is False
    assert parse(["export", "demo", "--out", "x", "--rotate-heads"]).rotate_heads is True


def test_rotate_heads_needs_the_residual_rotation(tmp_path, tiny_path):
    from qwen_ondevice.core.errors import UserError
    from qwen_ondevice.export.options import ExportOptions
    from qwen_ondevice.export.pipeline import export

    with pytest.raises(UserError, match="--rotate-heads rotates on top of the residual-stream rotation"):
        export(ExportOptions(model=str(tiny_path), precision="fp32", prompt_length=8, context_length=64,
                             eval_tokens=0, rotate=False, rotate_heads=True), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.demo
@pytest.mark.parametrize("heads", [False, True])
def test_rotated_weights_give_the_demo_logits_of_transformers(demo_checkpoint, demo_hf_model, hf_tokenizer, heads):
    """What the default w4a16 export reads (``RotatedWeights`` over the demo, float32 products;
    with ``heads``, what ``--rotate-heads`` reads) computes transformers' logits of the unrotated
    demo: the same argmax at every position and a difference within float32 rounding (a bound of
    1e-4 of the largest logit, about 800 float32 epsilons, for sums over H = 896 and 24 layers)."""
    from qwen_ondevice.quantize.rotation import ROTATION_SEED, RotatedWeights
    from qwen_ondevice.runtime.backends.torch_backend import TorchBackend
    from qwen_ondevice.runtime.engine import Engine

    cfg = demo_checkpoint.config
    rotated = demo_checkpoint.with_weights(RotatedWeights(demo_checkpoint.weights, cfg.hidden_size, ROTATION_SEED,
                                                          head_dim=cfg.head_dim if heads else None))
    msgs = [{"role": "user", "content": "Write a Python function that returns the n-th Fibonacci number."}]
    ids = hf_tokenizer(hf_tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False))["input_ids"]
    got = Engine(TorchBackend(rotated, context_length=256)).logits_all(ids)
    with torch.no_grad():
        ref = demo_hf_model(torch.tensor([ids])).logits[0].numpy()
    assert np.array_equal(got.argmax(-1), ref.argmax(-1))
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    # the rotated weights are other numbers: q_proj of layer 0 moved by about its own size
    w0 = demo_checkpoint.weights.get("model.layers.0.self_attn.q_proj.weight").float()
    w1 = rotated.weights.get("model.layers.0.self_attn.q_proj.weight").float()
    assert torch.linalg.norm(w1 - w0) > 0.5 * torch.linalg.norm(w0)
    if heads:  # v_proj's bias is rotated within each head: same length, other numbers
        b0 = demo_checkpoint.weights.get("model.layers.0.self_attn.v_proj.bias").float()
        b1 = rotated.weights.get("model.layers.0.self_attn.v_proj.bias").float()
        assert torch.allclose(torch.linalg.norm(b1), torch.linalg.norm(b0), rtol=1e-5)
        assert torch.linalg.norm(b1 - b0) > 0.5 * torch.linalg.norm(b0)


def test_an_export_started_before_rotate_heads_existed_resumes(tmp_path):
    """A state.json written before the option existed lacks it; it counts as its default (off), so
    the same export resumes, and one asked for --rotate-heads does not."""
    from dataclasses import asdict

    from qwen_ondevice.export.options import ExportOptions, ExportState

    old = asdict(ExportOptions(model="demo"))
    del old["rotate_heads"]
    state = tmp_path / ".export" / "state.json"
    state.parent.mkdir()
    state.write_text(json.dumps({"options": old, "done": {"files": {}}}))
    assert ExportState(tmp_path, ExportOptions(model="demo")).load() is True
    assert ExportState(tmp_path, ExportOptions(model="demo", rotate_heads=True)).load() is False
