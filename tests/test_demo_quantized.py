"""The real demo model at w4a16 and w8a16: accuracy targets of docs/numerics.md and a coherent
chat answer. The perplexities come from the export's own report.json, computed on held-out
WikiText-2 test text (never the calibration text) against the float model in transformers-equal
fp32 (the torch backend, which the modeling tests hold to transformers' logits)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import onnx
import pytest

from qwen_ondevice.cli.main import main
from qwen_ondevice.export.options import ExportOptions
from qwen_ondevice.export.pipeline import export

pytestmark = pytest.mark.demo
CL = 1024  # short context: the graphs' attention is over CL, and CI time matters
EVAL_TOKENS = 3072
#: Fewer than the default (8192), which would make each w4a16 export here about 2 minutes longer
#: (CI time); the default's gain over 4096 is measured by benchmarks (docs/numerics.md, "Calibration").
CALIBRATION_TOKENS = 4096
#: The CI slice of the generation-fidelity measure (the full run: benchmarks/bench_fidelity.py).
FIDELITY_PROMPTS, FIDELITY_TOKENS = 4, 48


def _export(folder, name: str, **options):
    out = folder / name
    options.setdefault("fidelity_prompts", 0)
    export(ExportOptions(model="demo", context_length=CL, calibration_tokens=CALIBRATION_TOKENS, eval_tokens=EVAL_TOKENS,
                         eval_window=1024, chipset="none", fidelity_tokens=FIDELITY_TOKENS, **options), out)
    return out


@pytest.fixture(scope="module")
def demo_w4a16(demo_checkpoint, module_dir):
    return _export(module_dir, "w4a16", precision="w4a16", fidelity_prompts=FIDELITY_PROMPTS)


@pytest.fixture(scope="module")
def demo_w8a16(demo_checkpoint, module_dir):
    return _export(module_dir, "w8a16", precision="w8a16")


@pytest.fixture(scope="module")
def demo_w4a16_5_parts(demo_checkpoint, module_dir):
    """The default w4a16 export split into 5 parts: the embedding, then 4 parts of decoder layers,
    so 3 mid-model boundaries where the residual stream crosses as one uint16 tensor."""
    return _export(module_dir, "w4a16_5_parts", precision="w4a16", num_parts=5)


def _accuracy(bundle) -> dict:
    acc = json.loads((bundle / "report.json").read_text())["accuracy"]
    assert acc["text"] == "wikitext2_test.txt" and acc["window"] == 1024
    assert acc["tokens"] == (EVAL_TOKENS // 1024) * 1023
    return acc


# The targets: w8a16 within +1.5%; w4a16 within +10% with 85% top-1.
# This configuration (default options, CL 1024, 4096 calibration tokens, 3069 held-out tokens)
# measured: w8a16 +0.83% / 97.2% top-1 / KL 0.0024; w4a16 (blocks of 32, the default) +6.76% /
# 88.6% / 0.047 (docs/numerics.md "Accuracy of the bundle" has the history). The per-channel
# option is covered by the tiny tests (test_qnn, test_quantization), not by a demo export of its own.
def test_w8a16_perplexity_ratio(demo_w8a16):
    acc = _accuracy(demo_w8a16)
    assert acc["perplexity_ratio"] <= 1.015, acc  # the target
    # no target for these two: a measured level (97.2%, 0.0024) held as a regression guard
    assert acc["top1_agreement"] >= 0.965, acc
    assert acc["mean_kl"] <= 0.004, acc


def test_w4a16_meets_the_perplexity_and_top1_targets(demo_w4a16):
    acc = _accuracy(demo_w4a16)
    assert acc["perplexity_ratio"] <= 1.10, acc
    assert acc["top1_agreement"] >= 0.85, acc


def test_report_holds_generation_fidelity_with_transformers_float_continuations(demo_w4a16, demo_hf_model, hf_tokenizer):
    """report.json's fidelity block covers the CI slice, and the float side of the comparison is
    transformers' own greedy generate: the cached float continuations equal it token for token."""
    import torch

    from qwen_ondevice.eval.fidelity import fidelity_prompts, reference_continuations

    f = json.loads((demo_w4a16 / "report.json").read_text())["fidelity"]
    assert f["prompts"] == FIDELITY_PROMPTS and f["skipped"] == 0 and f["max_new_tokens"] == FIDELITY_TOKENS
    assert f["per_kind"]["code"]["prompts"] == f["per_kind"]["chat"]["prompts"] == FIDELITY_PROMPTS // 2
    assert f["code"]["tasks"] == FIDELITY_PROMPTS // 2
    assert 0 <= f["prefix_median"] <= FIDELITY_TOKENS
    for p in fidelity_prompts(FIDELITY_PROMPTS)[:2]:  # one code prompt, one chat prompt
        ids = hf_tokenizer.apply_chat_template(p.messages, add_generation_prompt=True, return_tensors="pt")
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        [tokens] = reference_continuations("demo", [ids[0].tolist()], [FIDELITY_TOKENS])  # the report's, from the cache
        with torch.no_grad():
            out = demo_hf_model.generate(ids, max_new_tokens=FIDELITY_TOKENS, do_sample=False,
                                         eos_token_id=[151645, 151643], pad_token_id=151643)
        expected = out[0, ids.shape[1]:].tolist()
        if expected and expected[-1] in (151645, 151643):
            expected = expected[:-1]
        assert tokens == expected, p.id


def test_mid_model_boundaries_keep_the_accuracy(demo_w4a16, demo_w4a16_5_parts):
    """Each mid-model boundary is one tensor with one uint16 encoding on both sides (Genie's
    rule), and the three of them cost at most 0.5 points of perplexity ratio (the target of the
    7B issue) against the 2-part export, whose only boundary is the embedding output; scored on the
    same held-out tokens."""
    m = json.loads((demo_w4a16_5_parts / "manifest.json").read_text())
    parts = m["parts"]
    assert len(parts) == 5 and parts[0]["embedding"] and parts[-1]["head"]
    mid = [p for p in parts[1:] if p["layers"][0] > 0]
    assert len(mid) == 3
    for prev, part in zip(parts, parts[1:]):
        name = f"hidden_states_{part['layers'][0]}"
        out_enc = {json.dumps(o["encoding"], sort_keys=True) for g in prev["graphs"].values() for o in g["outputs"] if o["name"] == name}
        in_enc = {json.dumps(i["encoding"], sort_keys=True) for g in part["graphs"].values() for i in g["inputs"] if i["name"] == name}
        assert len(out_enc) == 1 and out_enc == in_enc, (prev["name"], part["name"], out_enc, in_enc)
        assert json.loads(out_enc.pop())["dtype"] == "uint16"
    two, five = _accuracy(demo_w4a16), _accuracy(demo_w4a16_5_parts)
    print(f"\n2 parts: {two}\n5 parts: {five}")
    assert five["reference_perplexity"] == pytest.approx(two["reference_perplexity"], rel=1e-6)
    assert five["perplexity_ratio"] <= two["perplexity_ratio"] + 0.005, (two, five)
    assert five["perplexity_ratio"] <= 1.10 and five["top1_agreement"] >= 0.85, five


def test_w4a16_default_keeps_v_and_o_at_int8_and_the_lm_head_at_int4(demo_w4a16):
    """The default w4a16, as its graphs store it: v_proj and o_proj INT8 in every layer, the
    other projections and the lm_head INT4 (in blocks of 32, as the manifest says), no int8 share
    (``--int8-fraction 0``); the int8 mix is covered by the tiny QNN tests."""
    m = json.loads((demo_w4a16 / "manifest.json").read_text())
    layers = m["model"]["config"]["num_hidden_layers"]
    mixed = m["quantization"]["mixed_precision"]
    assert mixed["count"] == 2 * layers and {w["reason"] for w in mixed["int8_projections"].values()} == {"--int8-projections"}
    assert m["quantization"]["weights"]["int8_projections"] == ["v_proj", "o_proj"]
    stored = {}  # weight name -> ONNX data type of its quantized initializer
    for part in m["parts"]:
        graph = onnx.load(str(demo_w4a16 / part["graphs"]["1"]["file"]), load_external_data=False).graph
        inits = {t.name: t for t in graph.initializer}
        for node in graph.node:
            q = node.input[0] if node.op_type == "DequantizeLinear" else ""
            if q in inits and (q.endswith("_proj.weight.q") or q == "lm_head.weight.q"):
                stored[q.removesuffix(".q")] = inits[q].data_type
    assert len(stored) == 7 * layers + 1
    for n, dtype in stored.items():
        eight = ".v_proj." in n or ".o_proj." in n
        assert dtype == (onnx.TensorProto.INT8 if eight else onnx.TensorProto.INT4), n
    blocks = {n: w.get("block_size") for p in m["parts"] for n, w in p["weights"].items() if n in stored}
    assert all(b == 32 for n, b in blocks.items() if stored[n] == onnx.TensorProto.INT4)
    weights = sum(p["weight_bytes"] for p in m["parts"])
    # fp32 is 2.5 GB; per output channel 0.44 GB; blocks of 32 0.52 GB (a float32 scale per 32
    # int4 weights is one more bit per weight)
    assert weights < 0.55e9


def test_w4a16_default_rotates_the_residual_stream(demo_w4a16, demo_hf_model):
    """The default w4a16 folds an orthogonal rotation into the weights (``--rotate``, on by default
    at w4a16): the embedding part's output for 128 token ids keeps the float embedding rows'
    lengths and inner products, which an orthogonal map preserves, while pointing elsewhere.
    Bound: a stored element is off by at most one int8 step of its row (max |row| / 127; the
    uint16 output and row-scale steps are far below it), so a row by at most sqrt(H) steps."""
    import numpy as np
    import onnxruntime as ort

    m = json.loads((demo_w4a16 / "manifest.json").read_text())
    assert m["quantization"]["rotation"] is not None
    part = m["parts"][0]
    assert part["embedding"]
    graph = part["graphs"]["128"]
    ids = np.linspace(0, demo_hf_model.config.vocab_size - 1, 128).astype(np.int32)
    sess = ort.InferenceSession(str(demo_w4a16 / graph["file"]), providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {graph["inputs"][0]["name"]: ids[None]})
    enc = graph["outputs"][0]["encoding"]
    x = (out[0].astype(np.float64) - enc["zero_point"]) * enc["scale"]  # (128, H)
    e = demo_hf_model.model.embed_tokens.weight.detach().double().numpy()[ids]
    bound = np.sqrt(x.shape[1]) * np.abs(x).max(axis=1) / 127  # (128,)
    nx, ne = np.linalg.norm(x, axis=1), np.linalg.norm(e, axis=1)
    assert np.all(np.abs(nx - ne) <= bound)
    gram_bound = bound[:, None] * nx[None, :] + ne[:, None] * bound[None, :]
    assert np.all(np.abs(x @ x.T - e @ e.T) <= gram_bound)
    # rotated, not the rows themselves: a random rotation moves a row by about sqrt(2) of its length
    assert np.all(np.linalg.norm(x - e, axis=1) > 0.5 * ne)


def test_inspect_names_the_quantization_scheme(demo_w4a16, demo_hf_model, capsys):
    """``inspect`` says how the default bundle is quantized: the rotated residual stream and the
    int8 projections, their count being what the ONNX graphs store as int8 2-D weights (v_proj and
    o_proj in every layer, the default's ``--int8-projections``)."""
    m = json.loads((demo_w4a16 / "manifest.json").read_text())
    int8 = set()
    for part in m["parts"]:
        for g in part["graphs"].values():
            model = onnx.load(str(demo_w4a16 / g["file"]), load_external_data=False)
            int8 |= {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2
                     and t.name.endswith("proj.weight.q")}
    layers = demo_hf_model.config.num_hidden_layers
    assert sorted(int8) == sorted(f"model.layers.{i}.self_attn.{k}_proj.weight.q" for i in range(layers) for k in "vo")
    assert main(["inspect", str(demo_w4a16)]) == 0
    text = capsys.readouterr().out
    assert f"v_proj/o_proj int8 ({len(int8)} tensors)" in text
    assert "residual stream rotated: random orthogonal (Haar)" in text
    assert "quantization w4a16: projections int4 symmetric per block of 32 input rows (gptq)" in text


#: Runs model-written code in a child Python: define it, find its Fibonacci function, print fn(2..11).
_FIB_HARNESS = """
import json, sys
scope = {}
exec(sys.stdin.read(), scope)
fn = next(v for k, v in scope.items() if callable(v) and "fib" in k.lower())
print(json.dumps([fn(n) for n in range(2, 12)]))
"""


def _run_fibonacci(code: str, text: str) -> list[int]:
    """fn(2..11) of the model's function, computed in a subprocess (isolated, 30 s timeout)."""
    r = subprocess.run([sys.executable, "-I", "-c", _FIB_HARNESS], input=code, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, (r.stderr[-2000:], text)
    return json.loads(r.stdout.strip().splitlines()[-1])


def _assert_fibonacci_answer(bundle, capsys, *options: str) -> None:
    prompt = "Write a Python function that returns the n-th Fibonacci number."
    capsys.readouterr()  # drop what the test printed before: only the command's JSON is parsed
    assert main(["--quiet", "generate", str(bundle), "--prompt", prompt, "--max-new-tokens", "160", "--json", *options]) == 0
    text = json.loads(capsys.readouterr().out)["text"]
    code = re.search(r"```(?:python)?\n(.*?)(```|$)", text, re.S)
    assert code, text
    values = _run_fibonacci(code.group(1).split("\n# Example")[0].split("\nprint(")[0], text)  # the function only
    assert all(values[i] == values[i - 1] + values[i - 2] for i in range(2, len(values))), (values, text)
    assert values[-1] in (55, 89), (values, text)  # fn(11): F(11) = 89 counting F(0) = 0, or 55 counting fib(1) = 0


def test_w4a16_chat_writes_a_correct_fibonacci_function(demo_w4a16, capsys):
    _assert_fibonacci_answer(demo_w4a16, capsys)


def test_w4a16_fast_host_numerics_keep_the_accuracy(demo_w4a16, capsys):
    """``--host-numerics fast`` (int8 activation blocks inside the weight products) on the same
    held-out tokens as the export's exact report, against the same float model."""
    from qwen_ondevice.eval.evaluate import evaluate_bundle

    exact = _accuracy(demo_w4a16)
    fast = evaluate_bundle(demo_w4a16, tokens=EVAL_TOKENS, window=1024, host_numerics="fast")
    print(f"\nexact: {exact}\nfast: {fast.format()}")
    assert fast.tokens == exact["tokens"] and fast.reference_perplexity == pytest.approx(exact["reference_perplexity"], rel=1e-6)
    # measured over 4092 tokens of the CL-4096 bundle: +4.97% fast vs +5.01% exact, top-1 88.10% vs 87.98%
    assert abs(fast.perplexity_ratio - exact["perplexity_ratio"]) <= 0.01, (fast, exact)
    assert fast.top1_agreement >= exact["top1_agreement"] - 0.01 and fast.top1_agreement >= 0.85
    assert fast.mean_kl <= 1.1 * exact["mean_kl"]
    _assert_fibonacci_answer(demo_w4a16, capsys, "--host-numerics", "fast")
