"""Issue 5: weight-shared QNN context binaries, Genie files, verify on the HTP simulator, qnn-htp backend.

A tiny random Qwen2 (2 layers, hidden 64, AR 8, CL 64) is exported at w4a16 and compiled for
snapdragon-8-elite; the HTP is the onnxruntime-qnn simulator on x86_64 (slow: tiny shapes only).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

pytest.importorskip("onnxruntime_qnn")

from qwen_ondevice.cli.main import main  # noqa: E402
from qwen_ondevice.core.bundle import read_manifest  # noqa: E402
from qwen_ondevice.export.options import ExportOptions  # noqa: E402
from qwen_ondevice.export.pipeline import export  # noqa: E402
from qwen_ondevice.qnn.chipsets import CHIPSETS, supported_chipsets  # noqa: E402
from qwen_ondevice.qnn.compile import (  # noqa: E402
    BIN_OVERHEAD_BYTES,
    MAX_BIN_TO_WEIGHT_RATIO,
    compile_in_child,
    compile_part,
)
from qwen_ondevice.qnn.prepare import CompileError  # noqa: E402

AR, CL = 8, 64
K = 4  # the compiled bundle's verify graph is AR-(K + 1): three graphs per part, one copy of the weights
CHIP = "snapdragon-8-elite"
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _options(ckpt, num_parts: int = 2, **kw) -> ExportOptions:
    return ExportOptions(model=str(ckpt), precision="w4a16", prompt_length=AR, context_length=CL, num_parts=num_parts,
                         calibration_tokens=256, **kw)


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_factory):
    return tiny_factory(layers=2)


@pytest.fixture(scope="module")
def compiled(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("qnn") / "bundle"
    # the int8 mix (not the default; without the default int8 v/o, so the mix alone decides which
    # projections are int8) so that the HTP also meets per-channel int8 projections; the lm_head
    # is the default int4
    export(_options(tiny_ckpt, chipset=CHIP, verify_tokens=K, int8_fraction=0.1, int8_projections=""), out)
    return out, json.loads((out / "manifest.json").read_text())


def _wrapper_nodes(path: Path) -> list[onnx.NodeProto]:
    return list(onnx.load(str(path), load_external_data=False).graph.node)


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def test_one_bin_per_part_with_all_three_graphs_inside(compiled):
    out, m = compiled
    q = m["qnn"]
    assert (q["chipset"], q["soc_model"], q["dsp_arch"]) == (CHIP, 69, "v79")
    folder = out / "qnn" / CHIP
    assert sorted(p.name for p in folder.glob("*.bin")) == ["part_1_of_2.bin", "part_2_of_2.bin"]
    assert [p["name"] for p in q["parts"]] == [p["name"] for p in m["parts"]]
    for p in q["parts"]:
        assert set(p["graphs"]) == {str(AR), str(K + 1), "1"}
        blob = (out / p["bin"]).read_bytes()
        names = set()
        for ar, g in p["graphs"].items():
            assert g["wrapper"] == f"qnn/{CHIP}/{p['name']}.ar{ar}.ctx.onnx"
            (node,) = [n for n in _wrapper_nodes(out / g["wrapper"]) if n.op_type == "EPContext"]
            a = _attrs(node)
            assert a["ep_cache_context"].decode() == f"{p['name']}.bin" and a["embed_mode"] == 0
            assert a["partition_name"].decode() == g["qnn_graph"]
            assert g["qnn_graph"].encode() in blob  # the graph is inside this .bin
            names.add(g["qnn_graph"])
        assert len(names) == 3
        # the files are in the manifest with their sha256
        assert p["bin"] in m["files"] and all(g["wrapper"] in m["files"] for g in p["graphs"].values())


def test_bytes_per_token_counts_the_binaries_and_one_embedding_row(compiled):
    """What the device reads: each decoder part's .bin as it lies on disk, the embedding one int8
    row of H with its uint16 row scale (the graph gathers both), the KV cache at CL; the ONNX data
    (float32 LPBQ scales) is not it."""
    from qwen_ondevice.core.bundle import bytes_per_token, read_manifest

    out, manifest = compiled
    m = read_manifest(out)
    sizes = bytes_per_token(m)
    assert sizes["weights_counted_from"] == "qnn .bin files"
    H = m.config.hidden_size
    emb, rest = sizes["parts"][0], sizes["parts"][1:]
    assert emb["read_per_token"] == H + 2
    folder = out / manifest["qnn"]["folder"]
    for p in rest:
        on_disk = (folder / f"{p['name']}.bin").stat().st_size
        assert p["device_bytes"] == p["read_per_token"] == on_disk
    assert sizes["weight_bytes_read_per_token"] == H + 2 + sum((folder / f"{p['name']}.bin").stat().st_size for p in rest)
    assert sizes["bytes_per_token_full_context"] == sizes["weight_bytes_read_per_token"] + manifest["kv_cache"]["bytes_per_token"] * CL


def test_all_compute_nodes_on_the_npu(compiled, capsys):
    out, m = compiled
    for p in m["qnn"]["parts"]:
        for ar, g in p["graphs"].items():
            nodes = _wrapper_nodes(out / g["wrapper"])
            assert [n.op_type for n in nodes] == ["EPContext"], f"{p['name']} AR-{ar}"
            src = onnx.load(str(out / m["parts"][int(p["name"].split("_")[1]) - 1]["graphs"][ar]["file"]), load_external_data=False)
            assert g["nodes"] == len(src.graph.node) and g["nodes_outside"] == 0 and g["npu_fraction"] == 1.0
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"QNN context binaries for {CHIP} (soc_model 69, HTP v79, HTP graph optimization level 3)" in text
    assert text.count("100.0% of nodes on the NPU") == 6  # 2 parts x 3 graphs
    # inspect reads the binaries themselves: every graph QNN finds in each .bin, with its tensors
    from qwen_ondevice.qnn.context_binary import read_context_binary

    for p in m["qnn"]["parts"]:
        for g in read_context_binary(out / p["bin"]):
            assert f"graph {g.name} (read from the .bin)" in text
            t = g.outputs[0]
            assert f"{t.name} {tuple(t.dims)} {t.dtype} scale {t.scale:.4g} offset {t.offset}" in text


def test_weights_stored_once(compiled, tmp_path):
    """The shared .bin is about one copy of the part's weights, and well below two contexts compiled apart."""
    out, m = compiled
    for p, part in zip(m["qnn"]["parts"], m["parts"]):
        assert p["bin_bytes"] == (out / p["bin"]).stat().st_size
        assert p["weight_bytes"] == part["weight_bytes"]
        # plus the fixed graph descriptions, and per output channel about 18 bytes of encoding,
        # which the tiny model's int4 lm_head (151936 channels of 64 weights) makes visible
        assert p["bin_bytes"] < MAX_BIN_TO_WEIGHT_RATIO * p["weight_bytes"] + BIN_OVERHEAD_BYTES
    # compile the last part's two graphs into two separate contexts: each carries the weights
    part = m["parts"][-1]
    separate = 0
    for ar in (AR, 1):
        d = tmp_path / f"ar{ar}"
        d.mkdir()
        res, _, err = compile_in_child({"chipset": CHIP, "graphs": [[ar, str(out / part["graphs"][str(ar)]["file"]), str(d / "g.onnx")]]})
        assert res["ok"], err
        separate += sum(b.stat().st_size for b in d.glob("*.bin"))
    shared = m["qnn"]["parts"][-1]["bin_bytes"]
    assert shared < 0.6 * separate, (shared, separate)


@pytest.fixture(scope="module")
def compiled_per_channel(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("qnn_per_channel") / "bundle"
    export(_options(tiny_ckpt, chipset=CHIP, weight_block_size=None), out)
    return out, json.loads((out / "manifest.json").read_text())


def _blocked_weight_dqs(model: onnx.ModelProto) -> int:
    return sum(1 for n in model.graph.node if n.op_type == "DequantizeLinear" and _attrs(n).get("block_size", 0) > 0)


def test_verify_passes(compiled, capsys):
    """The default w4a16 bundle (int4 blocks of 32, LPBQ grid) on the HTP's LPBQ path."""
    out, m = compiled
    src = onnx.load(str(out / m["parts"][1]["graphs"][str(AR)]["file"]), load_external_data=False)
    int4 = [n for n, w in m["parts"][1]["weights"].items() if w["bits"] == 4]
    assert len(int4) >= 10 and all(m["parts"][1]["weights"][n]["block_size"] == 32 for n in int4)
    assert _blocked_weight_dqs(src) == len(int4)  # every int4 projection is block-wise (the int8 ones per channel)
    _check_verify(out, capsys)


def test_per_channel_bundle_compiles_and_verifies(compiled_per_channel, capsys):
    out, m = compiled_per_channel
    src = onnx.load(str(out / m["parts"][1]["graphs"][str(AR)]["file"]), load_external_data=False)
    assert _blocked_weight_dqs(src) == 0
    for p in m["qnn"]["parts"]:
        # plus the fixed graph descriptions, and per output channel about 18 bytes of encoding,
        # which the tiny model's int4 lm_head (151936 channels of 64 weights) makes visible
        assert p["bin_bytes"] < MAX_BIN_TO_WEIGHT_RATIO * p["weight_bytes"] + BIN_OVERHEAD_BYTES
        for g in p["graphs"].values():
            assert [n.op_type for n in _wrapper_nodes(out / g["wrapper"])] == ["EPContext"]
    _check_verify(out, capsys)


def _check_verify(out: Path, capsys) -> None:
    assert main(["--quiet", "verify", str(out), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["ok"] and r["chipset"] == CHIP
    parts = {(row["part"], row["ar"]) for row in r["rows"]}
    assert parts == {(f"part_{i}_of_2", ar) for i in (1, 2) for ar in (AR, 1)}
    assert all(row["cosine"] >= 0.999 for row in r["rows"])
    # each difference also in steps of the output's own encoding, as the manifest gives it
    m = read_manifest(out)
    scale = {(p["name"], int(ar), io["name"]): io["encoding"]["scale"]
             for p in m.parts for ar, g in p["graphs"].items() for io in g["outputs"]}
    for row in r["rows"]:
        assert row["max_steps"] == pytest.approx(row["max_abs_diff"] / scale[(row["part"], row["ar"], row["output"])], abs=0.01)
    outputs = {row["output"] for row in r["rows"] if row["part"] == "part_2_of_2"}
    assert outputs == {"logits", "past_key_0_out", "past_value_0_out", "past_key_1_out", "past_value_1_out"}
    assert set(r["argmax"]) == {AR, 1} or set(r["argmax"]) == {str(AR), "1"}
    # the next token agrees, or (random tiny weights give near-flat logits) differs only where the
    # CPU's own top-2 margin is inside twice the HTP-vs-CPU logit difference
    for a in r["argmax"].values():
        assert a["sampled_row_agrees"] or (a["near_tie"] and a["disagreeing"][-1]["cpu_margin"] < 0.1), a
    # x86_64: re-prepared; an identical .bin, or one that differs in a few hundred bytes of graph
    # description (QNN's preparation of graphs that move uint8 tensors varies between runs)
    assert all("byte-identical" in t["how"] or "not byte-identical" in t["how"] for t in r["timings"]), r["timings"]


def test_a_re_preparation_that_differs_byte_for_byte_is_judged_by_what_qnn_reads_back(compiled, tmp_path, monkeypatch):
    """QNN's preparation is not deterministic: a fresh .bin that is not byte-identical (here every
    byte counted as differing, as after a shifted layout) passes when its size is within the
    allowance and the graphs and encodings libQnnSystem reads back equal the shipped binary's, and
    fails, saying so, when they do not."""
    from qwen_ondevice.qnn import context

    out, m = compiled
    part, qpart = m["parts"][1], m["qnn"]["parts"][1]
    chip = CHIPSETS[m["qnn"]["chipset"]]
    monkeypatch.setattr(context, "differing_bytes", lambda a, b: os.path.getsize(b))  # every byte differs
    sessions, how = context.open_part_context(out, part, qpart, chip, "0" * 64, tmp_path / "a", strict=True,
                                              context_length=CL, num_parts=len(m["parts"]))
    assert sorted(sessions) == sorted(int(a) for a in qpart["graphs"])
    assert "the graphs and encodings QNN reads back are equal" in how, how
    real = context.read_context_binary
    shipped = out / qpart["bin"]
    monkeypatch.setattr(context, "read_context_binary", lambda p: real(p)[:-1] if Path(p) == shipped else real(p))
    with pytest.raises(CompileError, match="the graphs and encodings QNN reads back differ"):
        context.open_part_context(out, part, qpart, chip, "0" * 64, tmp_path / "b", strict=True,
                                  context_length=CL, num_parts=len(m["parts"]))


def test_verify_refuses_other_chipset_and_uncompiled_bundle(compiled, capsys):
    out, _ = compiled
    assert main(["--quiet", "verify", str(out), "--chipset", "snapdragon-8-gen-3"]) == 2
    assert "snapdragon-8-elite only" in capsys.readouterr().err


def _generate(bundle: Path, backend: str) -> dict:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "qwen_ondevice.cli.main", "--quiet", "generate", str(bundle), "--backend", backend,
                           "--prompt", "Hello", "--max-new-tokens", "4", "--json"], capture_output=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    return json.loads(proc.stdout.decode().strip().splitlines()[-1])


def test_qnn_htp_backend_generates_the_ort_cpu_tokens(compiled):
    out, _ = compiled
    import numpy as np

    from qwen_ondevice.runtime.open_model import open_runtime

    htp = _generate(out, "qnn-htp")
    cpu = _generate(out, "ort-cpu")
    assert htp["backend"] == "qnn-htp" and len(htp["token_ids"]) == 4
    assert htp["prompt_ids"] == cpu["prompt_ids"]
    # Teacher-force the HTP's tokens through the CPU run of the same QDQ parts: each one is the
    # CPU's greedy choice, or within a near-tie of it (random tiny weights give flat logits).
    rt = open_runtime(str(out), "ort-cpu")
    logits = rt.engine.prefill(htp["prompt_ids"])
    agree = 0
    for t in htp["token_ids"]:
        top = int(np.argmax(logits))
        assert t == top or logits[top] - logits[t] < 0.1, (t, top, float(logits[top] - logits[t]))
        agree += t == top
        logits = rt.engine.feed([t])
    assert agree >= 3


def test_genie_config_fields_equal_manifest_and_tokenizer(compiled):
    from transformers import AutoTokenizer

    out, m = compiled
    genie = json.loads((out / "genie_config.json").read_text())["dialog"]
    ext = json.loads((out / "htp_backend_ext_config.json").read_text())
    cfg = m["model"]["config"]
    gen = json.loads((out / "generation_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(out))
    ctx = genie["context"]
    assert ctx["size"] == m["context_length"] == CL
    assert ctx["n-vocab"] == cfg["vocab_size"]
    # Genie prepends a bos-token >= 0 to every query; Qwen2's tokenizer adds nothing before the
    # text (its chat template starts with <|im_start|>), so Genie must add nothing either
    assert tok("x")["input_ids"] == tok("x", add_special_tokens=False)["input_ids"]
    assert ctx["bos-token"] == -1 and gen["bos_token_id"] == 151643
    im_end, eot = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    assert (im_end, eot) == (151645, 151643)
    assert set(ctx["eos-token"]) == {im_end, eot} and ctx["eot-token"] == im_end
    assert genie["tokenizer"]["path"] == "tokenizer.json" and (out / "tokenizer.json").exists()
    assert genie["sampler"]["greedy"] is True  # no do_sample in the generation config
    htp = genie["engine"]["backend"]["QnnHtp"]
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    assert htp["kv-dim"] == head_dim and htp["pos-id-dim"] == head_dim // 2
    assert htp["rope-theta"] == cfg["rope_theta"]
    assert genie["engine"]["backend"]["extensions"] == "htp_backend_ext_config.json"
    bins = genie["engine"]["model"]["binary"]["ctx-bins"]
    assert bins == [p["bin"] for p in m["qnn"]["parts"]] and all((out / b).is_file() for b in bins)
    dev = ext["devices"][0]
    assert (dev["soc_model"], dev["dsp_arch"]) == (m["qnn"]["soc_model"], m["qnn"]["dsp_arch"])
    assert ext["context"]["weight_sharing_enabled"] is True
    assert {"genie_config.json", "htp_backend_ext_config.json"} <= set(m["files"])


def test_genie_accepts_the_config(compiled):
    """libGenie.so from the onnxruntime-qnn wheel parses genie_config.json (child process)."""
    from qwen_ondevice.qnn.genie_run import genie_library, run_genie

    # the pinned onnxruntime-qnn (>= 2.7, Linux x86_64) carries libGenie.so
    assert genie_library() is not None, "no libGenie.so in this onnxruntime-qnn"
    out, _ = compiled
    config = json.loads((out / "genie_config.json").read_text())
    r = run_genie(config, out, create_dialog=False, timeout=120)
    assert r.config_status == 0, r.log[-5:]
    config["dialog"]["engine"]["backend"]["QnnHtp"]["n-layer"] = 2  # a key Genie's QnnHtp schema does not have
    assert run_genie(config, out, create_dialog=False, timeout=120).config_status not in (0, None)


def test_genie_spd_config_names_the_draft_bundle_and_genie_accepts_it(compiled, compiled_3, tmp_path, capsys):
    """``genie-spd`` writes Genie's draft-model dialog: the target's engine and the draft bundle's
    (its .bin files, relative to the target folder that Genie runs in), draft-len from the verify
    graph; libGenie parses it; a draft that is no compiled bundle, or a draft-len past the verify
    graph, is refused with one line."""
    from qwen_ondevice.qnn.genie_run import run_genie

    target, _ = compiled
    assert main(["genie-spd", str(target), "--draft", str(compiled_3)]) == 0
    spd = json.loads((target / "genie_config_spd.json").read_text())
    basic = json.loads((target / "genie_config.json").read_text())
    d = spd["dialog"]
    assert d["type"] == "spd" and d["spd"] == {"version": 1, "draft-len": K}
    assert [e["role"] for e in d["engine"]] == ["target", "draft"]
    assert {k: v for k, v in d["engine"][0].items() if k != "role"} == basic["dialog"]["engine"]
    draft_bins = [(target / b).resolve() for b in d["engine"][1]["model"]["binary"]["ctx-bins"]]
    shipped = json.loads((compiled_3 / "manifest.json").read_text())["qnn"]["parts"]
    assert draft_bins == [(compiled_3 / p["bin"]).resolve() for p in shipped] and len(draft_bins) == 3
    assert (target / d["engine"][1]["backend"]["extensions"]).resolve() == (compiled_3 / "htp_backend_ext_config.json").resolve()
    assert d["context"] == basic["dialog"]["context"]  # the same vocabulary: no draft-n-vocab
    r = run_genie(spd, target, create_dialog=False, timeout=120)
    assert r.config_status == 0, r.log[-5:]
    capsys.readouterr()
    assert "--draft-len 9" in _one_line_error(capsys, ["genie-spd", str(target), "--draft", str(compiled_3), "--draft-len", "9"])
    assert "compiled bundle" in _one_line_error(capsys, ["genie-spd", str(target), "--draft", str(tmp_path)])
    (target / "genie_config_spd.json").unlink()  # the bundle fixture is shared


def test_binaries_carry_ai_hub_graph_names_read_back_by_qnn(compiled):
    """The graph names inside each .bin (read by QNN itself, not from our manifest) are AI Hub's,
    and Genie's parse of them gives the AR and CL of their own tensors."""
    from qwen_ondevice.qnn.context_binary import read_context_binary

    out, m = compiled
    N = len(m["parts"])
    for i, p in enumerate(m["qnn"]["parts"], 1):
        graphs = read_context_binary(out / p["bin"])
        assert len(graphs) == 3
        for g in graphs:
            io = {t.name: t for t in g.inputs}
            ar = io["input_ids"].dims[1] if "input_ids" in io else io["attention_mask"].dims[2]
            kind = "token" if ar == 1 else "prompt"
            # AI Hub's form, with filler characters (no digits, no ar/cl) before the _i_of_N ending
            head, _, tail = g.name.partition(f"_{i}_of_{N}")
            assert tail == "" and head.startswith(f"{kind}_ar{ar}_cl{CL}"), g.name
            assert set(head[len(f"{kind}_ar{ar}_cl{CL}"):]) <= {"_", "x"}, g.name
            if "attention_mask" in io:
                assert io["attention_mask"].dims == (1, 1, ar, CL)
            # the wrapper runs this graph: its partition_name is the name inside the .bin
            (node,) = [n for n in _wrapper_nodes(out / p["graphs"][str(ar)]["wrapper"]) if n.op_type == "EPContext"]
            assert _attrs(node)["partition_name"].decode() == g.name


def test_boundaries_join_with_one_encoding(compiled):
    """Part 2 reads the very tensor part 1 writes: same name, dtype, shape, scale and offset in
    the binaries (as QNN reads them), and the manifest's encoding on both sides."""
    from qwen_ondevice.qnn.context_binary import read_context_binary

    out, m = compiled
    first, second = (read_context_binary(out / p["bin"]) for p in m["qnn"]["parts"])
    for ar in (AR, 1):
        (prod,) = [t for g in first for t in g.outputs if g.outputs[0].dims[1] == ar]
        cons = next(t for g in second for t in g.inputs if t.name == prod.name and t.dims[1] == ar)
        assert prod.name == "hidden_states_0" and prod.dtype == cons.dtype == "ufixed_point_16"
        assert (prod.dims, prod.scale, prod.offset) == (cons.dims, cons.scale, cons.offset)
        enc = next(o["encoding"] for o in m["parts"][0]["graphs"][str(ar)]["outputs"] if o["name"] == prod.name)
        assert np.float32(prod.scale) == np.float32(enc["scale"]) and prod.offset == -enc["zero_point"]


def test_genie_parses_every_graph_of_the_weight_shared_bundle(compiled):
    """The real (weight-shared) bundle in Genie: it sorts every graph into its (AR, CL) variant
    and split before the x86_64 simulator refuses the shared context."""
    from qwen_ondevice.eval.genie_verify import graphs_loaded, log_problems
    from qwen_ondevice.qnn.genie_run import run_genie

    out, m = compiled
    r = run_genie(json.loads((out / "genie_config.json").read_text()), out, create_dialog=True, timeout=300)
    assert r.config_status == 0
    assert graphs_loaded(r) == {(AR, CL): 2, (K + 1, CL): 2, (1, CL): 2}  # the verify graph too
    assert [p for p in log_problems(r) if "Shared weights" not in p and "context from binary" not in p] == []


@pytest.fixture(scope="module")
def compiled_3(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("qnn3") / "bundle"
    export(_options(tiny_ckpt, num_parts=3, chipset=CHIP, verify_tokens=K), out)
    return out


def test_genie_runs_a_three_part_bundle_like_the_runtime(compiled_3):
    """Genie itself (libGenie.so, simulator) on the non-shared twin of a 3-part bundle: every
    graph sorted into its (AR, CL) variant and split, no unconnected tensor or naming warning,
    and its greedy tokens equal the qnn-htp runtime's; the text query (Genie's own tokenizer on
    the templated prompt) decodes to the same text; the weight-shared bundle parses too."""
    from qwen_ondevice.eval.genie_verify import verify_genie
    from qwen_ondevice.runtime.open_model import open_bundle_runtime

    # a prompt whose tail (2 to K + 1 tokens after the AR-8 chunks) Genie runs through the verify graph
    tok = open_bundle_runtime(compiled_3, "ort-cpu").tokenizer
    prompt = next(p for p in ("Hi", "Hi there", "Hello, who are you?", "Say hello.", "What is 2 + 2?", "Name a colour.")
                  if 2 <= len(tok.apply_chat_template([{"role": "user", "content": p}])) % AR <= K + 1)
    # Genie's draft-model dialog with the bundle as its own draft: reported, and equal to plain
    # greedy decoding then (Genie 1.21's spd departs from it only after a rejected draft token)
    assert main(["genie-spd", str(compiled_3), "--draft", str(compiled_3)]) == 0
    r = verify_genie(compiled_3, prompt, new_tokens=4, timeout=900)
    (compiled_3 / "genie_config_spd.json").unlink()
    t, s = r["twin"], r["shared"]
    # Genie picks the smallest graph that holds the prompt's tail (its log); the runtime does the same
    assert t["prompt_graphs"][-1] == K + 1 and set(t["prompt_graphs"][:-1]) <= {AR}, t["prompt_graphs"]
    assert t["prompt_graphs"] == t["reference_prompt_graphs"] and t["prompt_graphs_equal"]
    assert t["dialog_status"] == 0 and [q["status"] for q in t["queries"]] == [0, 0], t
    assert t["graphs_loaded"] == {f"{AR},{CL}": 3, f"{K + 1},{CL}": 3, f"1,{CL}": 3}
    genie_tokens = t["queries"][0]["tokens"]
    assert len(genie_tokens) == 4 and genie_tokens == t["reference_tokens"]
    assert t["queries"][1]["text"] == t["reference_text"] and t["text_equal"]
    assert t["log_problems"] == []
    assert s["config_status"] == 0 and s["graphs_loaded"] == {f"{AR},{CL}": 3, f"{K + 1},{CL}": 3, f"1,{CL}": 3}
    # Genie's lookahead dialog (ngram 2) through the verify graph gives plain greedy decoding's tokens
    lade = r["lade"]
    assert lade["settings"]["ngram"] == 2 and lade["settings"]["window"] + lade["settings"]["gcap"] == K + 1
    assert (lade["config_status"], lade["dialog_status"]) == (0, 0), lade
    assert lade["tokens"][:4] == genie_tokens and len(lade["tokens"]) >= 8, lade
    assert lade["tokens"] == lade["reference_tokens"][:len(lade["tokens"])] and lade["tokens_equal"], lade
    assert lade["log_problems"] == [], lade
    spd = r["spd"]
    assert (spd["config_status"], spd["dialog_status"], spd["query_status"]) == (0, 0, 0), spd
    assert spd["settings"] == {"version": 1, "draft-len": K} and spd["text"].startswith(t["reference_text"]), spd
    assert spd["reference_text"].startswith(spd["text"]) and spd["text_equal"] and spd["log_problems"] == [], spd
    assert r["ok"]
    from qwen_ondevice.eval.genie_verify import format_genie_report

    assert format_genie_report(r).splitlines()[-1].startswith("PASS")


def _one_line_error(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error:"), err
    return err[0]


def test_unknown_chipset_lists_the_supported_ones(tiny_ckpt, tmp_path, capsys):
    msg = _one_line_error(capsys, ["--quiet", "export", str(tiny_ckpt), "--out", str(tmp_path / "x"), "--chipset", "snapdragon-999"])
    assert "unknown chipset 'snapdragon-999'" in msg
    for name in ("snapdragon-8-elite", "snapdragon-8-gen-3", "snapdragon-8-gen-2", "snapdragon-x-elite", "snapdragon-8-elite-gen-5"):
        assert name in msg
    assert sorted(supported_chipsets()) == sorted(["snapdragon-8-elite", "snapdragon-8-gen-3", "snapdragon-8-gen-2",
                                                   "snapdragon-x-elite", "snapdragon-8-elite-gen-5"])
    assert not (tmp_path / "x").exists()


def test_chipset_without_weight_sharing_is_refused(tiny_ckpt, tmp_path, capsys):
    assert CHIPSETS["snapdragon-8-gen-1"].arch < 73
    msg = _one_line_error(capsys, ["--quiet", "export", str(tiny_ckpt), "--out", str(tmp_path / "x"), "--chipset", "snapdragon-8-gen-1"])
    assert "weight sharing" in msg and "v73" in msg and "v69" in msg
    assert not (tmp_path / "x").exists()


def test_float_bundle_and_chipset_none_skip_compilation(tiny_ckpt, tmp_path):
    out = tmp_path / "fp32"
    export(ExportOptions(model=str(tiny_ckpt), precision="fp32", prompt_length=AR, context_length=CL, num_parts=2), out)
    assert not (out / "qnn").exists() and "qnn" not in json.loads((out / "manifest.json").read_text())
    assert not (out / "genie_config.json").exists()
    from qwen_ondevice.qnn.chipsets import check_chipset_option

    assert check_chipset_option("none", "w4a16") is None


def _qdq_graph(path: Path, bad: bool) -> None:
    """A uint16 -> uint16 QDQ graph: Sigmoid (the HTP takes it) or Det (it does not)."""
    s, z = helper.make_tensor("s", TensorProto.FLOAT, [], [1e-3]), helper.make_tensor("z", TensorProto.UINT16, [], [32768])
    nodes = [helper.make_node("DequantizeLinear", ["x", "s", "z"], ["xf"]),
             helper.make_node("Det" if bad else "Sigmoid", ["xf"], ["yf"]),
             helper.make_node("QuantizeLinear", ["yf", "s", "z"], ["y"])]
    shape_out = [1] if bad else [1, 2, 2]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.UINT16, [1, 2, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.UINT16, shape_out)], [s, z])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    onnx.save(m, str(path))


def test_a_graph_qnn_cannot_prepare_is_named_with_the_qnn_message(tmp_path):
    (tmp_path / "onnx").mkdir()
    _qdq_graph(tmp_path / "onnx" / "ok.onnx", bad=False)
    _qdq_graph(tmp_path / "onnx" / "bad.onnx", bad=True)
    part = {"name": "part_9_of_9", "weight_bytes": 1, "graphs": {"8": {"file": "onnx/ok.onnx"}, "1": {"file": "onnx/bad.onnx"}}}
    with pytest.raises(CompileError) as e:
        compile_part(tmp_path, part, CHIPSETS[CHIP], tmp_path / "work")
    msg = str(e.value)
    assert msg.startswith("part_9_of_9 AR-1 graph: QNN could not prepare it for snapdragon-8-elite")
    assert "Det" in msg  # QNN's own message names the op it refused
    assert not (tmp_path / "qnn" / CHIP / "part_9_of_9.bin").exists()


def test_failed_part_keeps_earlier_parts_and_rerun_resumes(tiny_ckpt, tmp_path, monkeypatch, capsys):
    import qwen_ondevice.qnn.compile as comp
    from qwen_ondevice.core.progress import set_quiet

    real = comp.compile_part
    calls = []

    def failing(root, part, chip, work, *rest):
        calls.append(part["name"])
        if part["name"] == "part_2_of_2":
            raise CompileError("part_2_of_2 AR-8 graph: QNN could not prepare it for snapdragon-8-elite: (simulated)")
        return real(root, part, chip, work, *rest)

    out = tmp_path / "b"
    monkeypatch.setattr(comp, "compile_part", failing)
    with pytest.raises(CompileError, match="part_2_of_2 AR-8"):
        export(_options(tiny_ckpt, chipset=CHIP), out)
    state = json.loads((out / ".export" / "state.json").read_text())["done"]
    assert f"qnn:{CHIP}:O3:part_1_of_2" in state and f"qnn:{CHIP}:O3:part_2_of_2" not in state and "manifest" not in state
    assert (out / "qnn" / CHIP / "part_1_of_2.bin").exists() and not (out / "manifest.json").exists()

    monkeypatch.setattr(comp, "compile_part", lambda *a: (calls.append(a[1]["name"]), real(*a))[1])
    set_quiet(False)
    capsys.readouterr()
    export(_options(tiny_ckpt, chipset=CHIP), out)
    assert calls == ["part_1_of_2", "part_2_of_2", "part_2_of_2"]  # part 1 not compiled again
    assert "part_1_of_2: compiled earlier, skipped" in capsys.readouterr().err
    m = json.loads((out / "manifest.json").read_text())
    assert [p["name"] for p in m["qnn"]["parts"]] == ["part_1_of_2", "part_2_of_2"]
    assert np.all([(out / p["bin"]).exists() for p in m["qnn"]["parts"]])

    # the finished bundle gains another chipset's binaries and a new report, without --force and
    # without redoing its parts: --chipset and --eval-tokens change no graph
    stamps = {k: v for k, v in json.loads((out / ".export" / "state.json").read_text())["done"].items() if k.startswith("part:")}
    data_mtime = {p["data"]: (out / p["data"]).stat().st_mtime_ns for p in m["parts"]}
    old_bins = {p["bin"]: (out / p["bin"]).read_bytes() for p in m["qnn"]["parts"]}
    other = "snapdragon-8-gen-3"
    export(_options(tiny_ckpt, chipset=other, eval_tokens=128), out)
    assert calls[3:] == ["part_1_of_2", "part_2_of_2"]
    done = json.loads((out / ".export" / "state.json").read_text())["done"]
    assert {k: v for k, v in done.items() if k.startswith("part:")} == stamps
    assert {p["data"]: (out / p["data"]).stat().st_mtime_ns for p in m["parts"]} == data_mtime
    m2 = json.loads((out / "manifest.json").read_text())
    assert m2["qnn"]["chipset"] == other and all(p["bin"].startswith(f"qnn/{other}/") for p in m2["qnn"]["parts"])
    assert {b: (out / b).read_bytes() for b in old_bins} == old_bins  # the first chipset's binaries stay
    assert set(old_bins) <= set(m2["files"])
    assert json.loads((out / "report.json").read_text())["accuracy"]["tokens"] == 2 * (CL - 1)


def test_onnx_runtime_runs_a_renamed_binary_bit_identically(compiled, tmp_path):
    """A context binary renamed in place (graph name inside the .bin, EPContext partition_name)
    still loads and runs in ONNX Runtime with the same outputs as before the renaming. Non-shared,
    since the x86_64 simulator cannot load a weight-shared context."""
    import onnxruntime as ort

    from qwen_ondevice.qnn.context_binary import read_context_binary
    from qwen_ondevice.qnn.ep_options import qnn_session_options
    from qwen_ondevice.qnn.prepare import name_graphs, partition_name

    out, m = compiled
    part = m["parts"][1]
    rng = np.random.default_rng(0)
    feeds = {io["name"]: rng.integers(0, 200, io["shape"]).astype(np.uint16 if io["dtype"] == "uint16" else np.uint8)
             for io in part["graphs"]["1"]["inputs"]}
    wrapper = tmp_path / "part.ar1.ctx.onnx"
    res, _, err = compile_in_child({"chipset": CHIP, "share": False, "graphs": [[1, str(out / part["graphs"]["1"]["file"]), str(wrapper)]]})
    assert res["ok"], err
    (b,) = tmp_path.glob("*.bin")

    def run():
        sess = ort.InferenceSession(str(wrapper), sess_options=qnn_session_options(CHIPSETS[CHIP]))
        return sess.run(None, feeds)

    before, old = run(), partition_name(wrapper)
    name_graphs(b, {1: (wrapper, info := {"qnn_graph": old})}, CL, 2, 2)
    assert info["qnn_graph"] != old and partition_name(wrapper) == info["qnn_graph"]
    assert [g.name for g in read_context_binary(b)] == [info["qnn_graph"]]
    for x, y in zip(before, run()):
        np.testing.assert_array_equal(x, y)


def test_int8_fraction_keeps_the_worst_int4_projections_at_int8(compiled):
    """GPTQ and the int8 mix (``--int8-fraction 0.1``) in the fast suite: per part, the
    projections kept at int8 are those with the largest measured int4 output error, taken
    greedily while they fit 10% of the part's projection weights, and the graph stores exactly
    those as int8 (the rest int4)."""
    out, m = compiled
    assert m["quantization"]["weights"]["method"] == "gptq"
    for part in m["parts"][1:]:
        graph = onnx.load(str(out / part["graphs"][str(AR)]["file"]), load_external_data=False).graph
        inits = {t.name: t for t in graph.initializer}
        stored = {}  # projection -> (data type, elements)
        for node in graph.node:
            if node.op_type == "DequantizeLinear" and node.input[0].endswith(".q") and node.input[0] in inits:
                name = node.input[0].removesuffix(".q")
                if name.startswith("model.layers.") and name.endswith("_proj.weight"):
                    t = inits[node.input[0]]
                    stored[name] = (t.data_type, int(np.prod(t.dims)))
        weights = {n: w for n, w in part["weights"].items() if n.startswith("model.layers.")}
        assert set(stored) == set(weights)
        int4_error = {n: w.get("int4_rel_error", w["rel_error"]) for n, w in weights.items()}
        budget = 0.1 * sum(size for _, size in stored.values())
        expected, used = set(), 0
        for n in sorted(weights, key=lambda n: -int4_error[n]):
            if used + stored[n][1] <= budget:
                used += stored[n][1]
                expected.add(n)
        chosen = {n for n, w in weights.items() if w["bits"] == 8}
        assert chosen and chosen == expected, (part["name"], sorted(chosen), sorted(expected))
        for n, (dtype, _) in stored.items():
            assert dtype == (onnx.TensorProto.INT8 if n in chosen else onnx.TensorProto.INT4), n
        for n in chosen:  # int8 measured closer to the float output than int4 was
            assert weights[n]["rel_error"] < weights[n]["int4_rel_error"], n
