"""Export issue: ONNX parts vs the torch adapted graph, shared weights, ORT backend, resume, refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import one_line_error as _one_line_error

from qwen_ondevice.cli.main import main
from qwen_ondevice.core.bundle import read_manifest
from qwen_ondevice.core.checkpoint import load_checkpoint
from qwen_ondevice.core.modeling import build_part
from qwen_ondevice.export.options import ExportOptions
from qwen_ondevice.export.pipeline import export
from qwen_ondevice.runtime.open_model import open_runtime

AR, CL = 8, 64


@pytest.fixture(scope="module")
def tiny_bundle(tiny_factory, tmp_path_factory):
    ckpt = tiny_factory(layers=3)
    out = tmp_path_factory.mktemp("bundle") / "b"
    export(ExportOptions(model=str(ckpt), precision="fp32", prompt_length=AR, context_length=CL, num_parts=3, eval_tokens=256, eval_window=CL), out)
    return ckpt, out


def _random_inputs(spec: dict, rng) -> dict[str, np.ndarray]:
    feeds = {}
    for i in spec["inputs"]:
        shape = tuple(i["shape"])
        if i["name"] == "input_ids":
            feeds[i["name"]] = rng.integers(0, 151936, size=shape).astype(np.int32)
        elif i["name"] == "attention_mask":
            m = np.where(rng.random(shape) < 0.3, -1.0e4, 0.0).astype(np.float32)
            m[..., -1] = 0.0  # every row sees something
            feeds[i["name"]] = m
        elif i["name"].startswith("position_ids"):
            ang = rng.random(shape) * 6.28
            feeds[i["name"]] = (np.cos(ang) if i["name"].endswith("cos") else np.sin(ang)).astype(np.float32)
        else:
            feeds[i["name"]] = rng.normal(0, 1, size=shape).astype(np.float32)
    return feeds


def test_each_part_and_ar_matches_torch(tiny_bundle):
    import onnxruntime as ort

    ckpt_path, out = tiny_bundle
    ckpt = load_checkpoint(ckpt_path)
    m = read_manifest(out)
    rng = np.random.default_rng(0)
    assert m.ar_lengths == [AR, 1]
    for spec in m.part_specs():
        module = build_part(ckpt.config, ckpt.weights, spec)
        part = m.parts[spec.index - 1]
        for ar in m.ar_lengths:
            g = part["graphs"][str(ar)]
            feeds = _random_inputs(g, rng)
            sess = ort.InferenceSession(str(out / g["file"]), providers=["CPUExecutionProvider"])
            names = [o["name"] for o in g["outputs"]]
            got = dict(zip(names, sess.run(names, feeds)))
            with torch.no_grad():
                if spec.embedding:
                    ref = {spec.hidden_out: module(torch.from_numpy(feeds["input_ids"]))}
                else:
                    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
                    L = list(spec.layers)
                    y, ks, vs = module(t[spec.hidden_in], t["attention_mask"], t["position_ids_cos"],
                                       t["position_ids_sin"], [t[f"past_key_{l}_in"] for l in L],
                                       [t[f"past_value_{l}_in"] for l in L])
                    ref = {("logits" if spec.head else spec.hidden_out): y}
                    for l, k, v in zip(L, ks, vs):
                        ref[f"past_key_{l}_out"], ref[f"past_value_{l}_out"] = k, v
            assert set(ref) == set(got)
            for name, r in ref.items():
                np.testing.assert_allclose(got[name], r.numpy(), atol=1e-4, rtol=0, err_msg=f"{spec.name} AR-{ar} {name}")


def test_graph_io_names_follow_contract(tiny_bundle):
    _, out = tiny_bundle
    m = read_manifest(out)
    first, middle, last = m.parts
    assert [i["name"] for i in first["graphs"]["1"]["inputs"]] == ["input_ids"]
    assert first["graphs"]["1"]["inputs"][0]["dtype"] == "int32"
    names = [i["name"] for i in middle["graphs"][str(AR)]["inputs"]]
    # the boundary tensors carry one name on both sides (Genie joins parts by name):
    # hidden_states_{L} enters decoder layer L (transformers' output_hidden_states numbering)
    l0 = middle["layers"][0]
    assert names[:4] == [f"hidden_states_{l0}", "attention_mask", "position_ids_cos", "position_ids_sin"]
    assert [o["name"] for o in first["graphs"][str(AR)]["outputs"]] == ["hidden_states_0"] and l0 == 0
    assert [o["name"] for o in middle["graphs"][str(AR)]["outputs"]][0] == f"hidden_states_{middle['layers'][1]}"
    assert [i["name"] for i in last["graphs"][str(AR)]["inputs"]][0] == f"hidden_states_{middle['layers'][1]}"
    l0 = middle["layers"][0]
    shapes = {i["name"]: tuple(i["shape"]) for i in middle["graphs"][str(AR)]["inputs"]}
    cfg = m.config
    assert shapes["attention_mask"] == (1, 1, AR, CL)
    assert shapes[f"past_key_{l0}_in"] == (cfg.num_key_value_heads, 1, cfg.head_dim, CL - AR)
    assert shapes[f"past_value_{l0}_in"] == (cfg.num_key_value_heads, 1, CL - AR, cfg.head_dim)
    outs = {o["name"]: tuple(o["shape"]) for o in last["graphs"]["1"]["outputs"]}
    assert outs["logits"] == (1, 1, cfg.vocab_size)
    L = cfg.num_hidden_layers - 1
    assert outs[f"past_key_{L}_out"] == (cfg.num_key_value_heads, 1, cfg.head_dim, 1)
    assert outs[f"past_value_{L}_out"] == (cfg.num_key_value_heads, 1, 1, cfg.head_dim)


def test_both_graphs_share_one_weights_file(tiny_bundle):
    ckpt_path, out = tiny_bundle
    m = read_manifest(out)
    for part in m.parts:
        locations = set()
        for g in part["graphs"].values():
            model = onnx.load(str(out / g["file"]), load_external_data=False)
            for init in model.graph.initializer:
                if init.data_location == onnx.TensorProto.EXTERNAL:
                    locations.add({e.key: e.value for e in init.external_data}["location"])
        assert locations == {Path(part["data"]).name}
    # total weight bytes within 1% of one copy of the checkpoint's fp32 weights
    from safetensors import safe_open

    one_copy = 0
    with safe_open(str(Path(ckpt_path) / "model.safetensors"), "pt") as f:
        for k in f.keys():
            one_copy += f.get_tensor(k).numel() * 4
    data_bytes = sum((out / p["data"]).stat().st_size for p in m.parts)
    assert abs(data_bytes - one_copy) / one_copy < 0.01


def test_ort_backend_matches_transformers_logits(tiny_bundle):
    ckpt_path, out = tiny_bundle
    rt = open_runtime(str(out))
    assert rt.engine.backend.name == "ort-cpu"
    hf = load_checkpoint(ckpt_path).load_transformers_model()
    ids = list(np.random.default_rng(1).integers(0, 151936, size=3 * AR + 3))
    for n in (AR - 1, AR, AR + 1, 2 * AR - 1, 2 * AR, 2 * AR + 1, 3 * AR + 3):
        got = rt.engine.logits_all(ids[:n])
        with torch.no_grad():
            ref = hf(torch.tensor([ids[:n]])).logits[0].numpy()
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0, err_msg=f"prompt length {n}")


def test_ort_kv_cached_greedy_equals_full_recompute(tiny_bundle):
    ckpt_path, out = tiny_bundle
    rt = open_runtime(str(out))
    hf = load_checkpoint(ckpt_path).load_transformers_model()
    prompt = [151644, 872, 198, 6023, 151645]
    logits = rt.engine.prefill(prompt)
    seq = list(prompt)
    cached = []
    for _ in range(50):
        t = int(np.argmax(logits))
        cached.append(t)
        seq.append(t)
        logits = rt.engine.feed([t])
    seq = list(prompt)
    recomputed = []
    with torch.no_grad():
        for _ in range(50):
            t = int(hf(torch.tensor([seq])).logits[0, -1].argmax())
            recomputed.append(t)
            seq.append(t)
    assert cached == recomputed


def test_fp16_bundle_close_to_fp32(tiny_factory, tmp_path):
    ckpt = tiny_factory(layers=3)
    out = tmp_path / "fp16"
    export(ExportOptions(model=str(ckpt), precision="fp16", prompt_length=AR, context_length=CL, num_parts=2, eval_tokens=0), out)
    m = read_manifest(out)
    assert m.data["kv_cache"]["dtype"] == "float16"
    assert all(i["dtype"] == "float16" for i in m.parts[1]["graphs"]["1"]["inputs"] if i["name"] != "input_ids")
    rt = open_runtime(str(out))
    hf = load_checkpoint(ckpt).load_transformers_model()
    ids = list(range(1000, 1000 + 2 * AR + 1))
    got = rt.engine.logits_all(ids)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.9
    fp16_bytes = sum((out / p["data"]).stat().st_size for p in m.parts)
    assert fp16_bytes < 0.51 * sum(os.path.getsize(p) for p in Path(ckpt).glob("*.safetensors"))


def _files_sha(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())["files"]


def test_resume_after_sigkill_gives_same_files(tiny_factory, tmp_path):
    ckpt = str(tiny_factory(layers=4))
    args = [ckpt, "--precision", "fp32", "--prompt-length", str(AR), "--context-length", str(CL), "--num-parts", "4", "--eval-tokens", "128"]
    ref = tmp_path / "ref"
    assert main(["--quiet", "export", *args, "--out", str(ref)]) == 0
    out = tmp_path / "killed"
    env = dict(os.environ, QWEN_ONDEVICE_EXPORT_STAGE_DELAY="1.5")
    proc = subprocess.Popen([sys.executable, "-m", "qwen_ondevice.cli.main", "export", *args, "--out", str(out)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / ".export" / "state.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        if state.exists() and "part:part_2_of_4" in json.loads(state.read_text())["done"]:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = json.loads(state.read_text())["done"]
    assert "part:part_2_of_4" in done and "manifest" not in done  # killed between stages
    assert not (out / "manifest.json").exists()
    assert main(["--quiet", "export", *args, "--out", str(out)]) == 0
    assert _files_sha(out) == _files_sha(ref)


def test_quantized_export_killed_in_each_stage_resumes_to_the_same_files(tiny_factory, tmp_path):
    """SIGKILL once per kind of stage, each time when the stage's work is done but before its
    stamp (the worst moment: key equalization has rewritten the float weights in place, the
    calibration files and QDQ graphs are written): every re-run resumes, and the finished bundle
    equals an uninterrupted export file by file (sha256), the float intermediates deleted."""
    ckpt = str(tiny_factory(layers=4))
    args = [ckpt, "--precision", "w4a16", "--prompt-length", str(AR), "--context-length", str(CL), "--num-parts", "3",
            "--calibration-tokens", "256", "--eval-tokens", "128", "--chipset", "none"]
    ref = tmp_path / "ref"
    assert main(["--quiet", "export", *args, "--out", str(ref)]) == 0
    out = tmp_path / "killed"
    stages = ["float:part_2_of_3", "kveq:part_2_of_3", "calib:part_2_of_3", "part:part_2_of_3", "report", "manifest"]
    for stage in stages:
        env = dict(os.environ, QWEN_ONDEVICE_EXPORT_KILL_AFTER=stage)
        r = subprocess.run([sys.executable, "-m", "qwen_ondevice.cli.main", "--quiet", "export", *args, "--out", str(out)],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=300)
        assert r.returncode == -signal.SIGKILL, (stage, r.returncode, r.stderr[-2000:])
    assert main(["--quiet", "export", *args, "--out", str(out)]) == 0
    assert _files_sha(out) == _files_sha(ref)
    assert not (out / ".export" / "float").exists() and not (out / ".export" / "calib").exists()


def test_progress_bar_shows_done_total_and_rate_and_nothing_without_work(capsys):
    from qwen_ondevice.core.progress import bar, set_quiet

    set_quiet(False)  # the default; CLI tests run with --quiet
    assert list(bar([], desc="[quantize] part_1_of_2", unit="weight")) == []
    assert capsys.readouterr().err == ""  # the embedding part has no MatMul weight: no empty bar
    assert list(bar(range(3), desc="[quantize] part_2_of_2", unit="weight")) == [0, 1, 2]
    err = capsys.readouterr().err
    assert "[quantize] part_2_of_2" in err and "3/3" in err and "weight/s" in err, err


def test_export_refuses_a_plan_the_machine_cannot_hold(tiny_factory, tmp_path, capsys, monkeypatch):
    """The estimate is checked before anything is written; the message names the stage and a way out."""
    import qwen_ondevice.export.footprint as footprint

    ckpt = str(tiny_factory(layers=3))
    args = ["--quiet", "export", ckpt, "--precision", "w4a16", "--prompt-length", str(AR), "--context-length", str(CL),
            "--chipset", "none"]
    monkeypatch.setattr(footprint, "machine_memory_bytes", lambda: 200 << 20)
    capsys.readouterr()  # what making the checkpoint printed
    msg = _one_line_error(capsys, [*args, "--out", str(tmp_path / "a")])
    assert "GB of memory at its peak" in msg and "0.2 GB available" in msg and not (tmp_path / "a").exists()
    monkeypatch.setattr(footprint, "machine_memory_bytes", lambda: 1 << 40)
    monkeypatch.setattr(footprint.shutil, "disk_usage", lambda p: shutil_usage(free=1 << 20))
    msg = _one_line_error(capsys, [*args, "--out", str(tmp_path / "b")])
    assert "GB of disk" in msg and "bigger disk" in msg and not (tmp_path / "b").exists()


def shutil_usage(free: int):
    import shutil

    return shutil._ntuple_diskusage(1 << 40, (1 << 40) - free, free)


def test_refusals(tiny_bundle, tiny_factory, tmp_path, capsys):
    ckpt = str(tiny_factory(layers=3))
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    msg = _one_line_error(capsys, ["--quiet", "export", ckpt, "--out", str(other)])
    assert "--force" in msg and (other / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]

    msg = _one_line_error(capsys, ["--quiet", "export", ckpt, "--out", str(tmp_path / "x"), "--prompt-length", "64", "--context-length", "64"])
    assert "prompt-length" in msg and not (tmp_path / "x").exists()
    msg = _one_line_error(capsys, ["--quiet", "export", ckpt, "--out", str(tmp_path / "y"), "--context-length", "8192"])
    assert "max_position_embeddings 4096" in msg and not (tmp_path / "y").exists()

    # a bundle whose file fails its sha256
    _, good = tiny_bundle
    bad = tmp_path / "bad"
    subprocess.run(["cp", "-r", str(good), str(bad)], check=True)
    with open(bad / "onnx" / "part_2_of_3.data", "r+b") as f:
        f.seek(100)
        f.write(b"\x01\x02\x03\x04")
    msg = _one_line_error(capsys, ["--quiet", "generate", str(bad), "--prompt", "hi"])
    assert "sha256" in msg and "part_2_of_3.data" in msg
    # an unknown manifest schema
    m = json.loads((good / "manifest.json").read_text())
    m["schema_version"] = 99
    bad2 = tmp_path / "bad2"
    subprocess.run(["cp", "-r", str(good), str(bad2)], check=True)
    (bad2 / "manifest.json").write_text(json.dumps(m))
    msg = _one_line_error(capsys, ["--quiet", "inspect", str(bad2)])
    assert "schema" in msg
    # a missing or mistyped field is named at open, not met as a KeyError inside a backend
    breakages = [
        (lambda d: d.pop("context_length"), "field context_length: field required"),
        (lambda d: d.__setitem__("context_length", "64"), "field context_length: input should be a valid integer"),
        (lambda d: d["parts"][1]["graphs"][str(AR)].pop("file"), f"field parts[1].graphs.{AR}.file: field required"),
        (lambda d: d["kv_cache"].__setitem__("dtype", "int3"), "field kv_cache.dtype: input should be"),
        (lambda d: d["parts"][2].__setitem__("layers", [1]), "field parts[2].layers"),
    ]
    for i, (breaking, words) in enumerate(breakages):
        m = json.loads((good / "manifest.json").read_text())
        breaking(m)
        broken = tmp_path / f"broken{i}"
        subprocess.run(["cp", "-r", str(good), str(broken)], check=True)
        (broken / "manifest.json").write_text(json.dumps(m))
        msg = _one_line_error(capsys, ["--quiet", "generate", str(broken), "--prompt", "hi"])
        assert words in msg and "manifest.json" in msg, msg


def test_open_hashes_only_files_changed_since_they_last_matched(tiny_bundle, tmp_path, monkeypatch):
    import qwen_ondevice.core.bundle as bundle
    from qwen_ondevice.core.errors import UserError

    _, good = tiny_bundle
    b = tmp_path / "b"
    subprocess.run(["cp", "-r", str(good), str(b)], check=True)
    hashed = []
    real = bundle.sha256_file
    monkeypatch.setattr(bundle, "sha256_file", lambda p: (hashed.append(Path(p).name), real(p))[1])
    m = read_manifest(b)
    assert len(hashed) == len(m.data["files"])
    hashed.clear()
    read_manifest(b)
    assert hashed == []
    with open(b / "onnx" / "part_2_of_3.data", "r+b") as f:  # same size, other bytes
        f.seek(100)
        flipped = bytes(x ^ 0xFF for x in f.read(4))
        f.seek(100)
        f.write(flipped)
    with pytest.raises(UserError, match="part_2_of_3.data"):
        read_manifest(b)
    assert hashed == ["part_2_of_3.data"]


def test_inspect_reports_parts_ops_and_integrity(tiny_bundle, capsys):
    from qwen_ondevice.eval.inspect_bundle import inspect_bundle

    _, out = tiny_bundle
    r = inspect_bundle(out)
    cfg = read_manifest(out).config
    assert r["bad_files"] == []
    assert r["quantization"] is None  # fp32: no scheme to name
    assert [p["name"] for p in r["parts"]] == ["part_1_of_3", "part_2_of_3", "part_3_of_3"]
    layers_in_part2 = r["parts"][1]["layers"][1] - r["parts"][1]["layers"][0]
    assert r["parts"][1]["graphs"]["1"]["ops"]["Softmax"] == layers_in_part2
    assert r["parts"][1]["graphs"][str(AR)]["ops"]["MatMul"] == 9 * layers_in_part2  # 7 projections + 2 attention
    assert r["kv_cache_bytes_per_token"] == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4
    assert r["kv_cache_bytes_full_context"] == r["kv_cache_bytes_per_token"] * CL
    # a float bundle is read as its ONNX data, the embedding one fp32 row of H
    sizes = r["bytes_per_token"]
    assert sizes["weights_counted_from"] == "ONNX data"
    emb = sizes["parts"][0]
    assert emb["read_per_token"] == cfg.hidden_size * 4
    data_bytes = sum((out / p["data"]).stat().st_size for p in read_manifest(out).parts)
    assert sizes["weight_bytes_read_per_token"] == data_bytes - emb["onnx_data_bytes"] + cfg.hidden_size * 4
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "all" in text and "match their sha256" in text and "part_3_of_3" in text
    assert "quantization" not in text


def test_report_of_fp32_bundle_matches_its_float_reference(tiny_bundle):
    """The fp32 bundle computes what the float model computes, so the report says so."""
    _, out = tiny_bundle
    r = json.loads((out / "report.json").read_text())
    acc = r["accuracy"]
    assert acc["tokens"] == 4 * (CL - 1) and acc["window"] == CL and acc["text"] == "wikitext2_test.txt"
    assert abs(acc["perplexity_ratio"] - 1) < 1e-4
    assert acc["top1_agreement"] > 0.99 and acc["mean_kl"] < 1e-6
    assert "report.json" in read_manifest(out).data["files"]
    assert r["sizes"]["kv_cache_bytes_full_context"] == r["sizes"]["kv_cache_bytes_per_token"] * CL


def test_ort_trimmed_past_matches_transformers_logits(tiny_bundle):
    """The ort-cpu backend feeds a call only the filled past slots, rounded up to its
    ``past_bucket`` (host_graph.symbolic_past): logits still equal transformers', in prefill and
    in decode, and the calls were really fed shorter pasts than the graphs' static P."""
    ckpt_path, out = tiny_bundle
    rt = open_runtime(str(out))
    be = rt.engine.backend
    be.past_bucket = 8
    fed: list[tuple[int, int]] = []  # (AR, past length fed)
    session = be.session

    class Recorder:
        def __init__(self, sess):
            self.sess = sess

        def run(self, names, feeds):
            if "past_value_0_in" in feeds:
                fed.append((feeds["attention_mask"].shape[2], feeds["past_value_0_in"].shape[2]))
                assert feeds["attention_mask"].shape[-1] == fed[-1][1] + fed[-1][0]
            return self.sess.run(names, feeds)

    be.session = lambda i, ar: Recorder(session(i, ar))
    hf = load_checkpoint(ckpt_path).load_transformers_model()
    ids = [int(t) for t in np.random.default_rng(2).integers(0, 151936, size=3 * AR + 3)]
    for n in (1, AR + 1, 3 * AR + 3):
        got = rt.engine.logits_all(ids[:n])
        with torch.no_grad():
            ref = hf(torch.tensor([ids[:n]])).logits[0].numpy()
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0, err_msg=f"prompt length {n}")
    seq = ids[:AR + 3]
    logits = rt.engine.prefill(seq)
    for _ in range(2 * AR):  # decode across two bucket boundaries
        seq.append(int(np.argmax(logits)))
        logits = rt.engine.feed([seq[-1]])
    with torch.no_grad():
        ref = hf(torch.tensor([seq])).logits[0, -1].numpy()
    np.testing.assert_allclose(logits.reshape(-1), ref, atol=1e-4, rtol=0)
    assert {w for _, w in fed} >= {8, 16, 24, 32} and all(w % 8 == 0 for _, w in fed), sorted(set(fed))
    assert max(w for ar, w in fed if ar == 1) < CL - 1 and max(w for ar, w in fed if ar == AR) < CL - AR


#: Installed distributions (folder name prefixes) of the ``export`` extra, and the top-level modules
#: they provide: a runtime-only install has none of them.
EXPORT_EXTRA_ENTRIES = ("torch", "functorch", "torchgen", "transformers", "safetensors", "gguf", "accelerate",
                        "huggingface_hub")
EXPORT_EXTRA_MODULES = ("torch", "transformers", "safetensors", "gguf", "accelerate", "huggingface_hub")
CHILD = """import json, sys
from qwen_ondevice.cli.main import main
try:
    code = main(sys.argv[1:])
finally:
    print(json.dumps({"export_extra_imported": sorted(m for m in %r if m in sys.modules)}), file=sys.stderr)
sys.exit(code)
""" % (EXPORT_EXTRA_MODULES,)


def _runtime_only_site(tmp_path: Path) -> Path:
    """A folder of links to every installed package but the ``export`` extra's: what a runtime-only
    install (``pip install qwen-ondevice``) gives, seen by a Python started without site-packages."""
    import sysconfig

    packages = Path(sysconfig.get_paths()["purelib"])
    overlay = tmp_path / "site-packages-runtime-only"
    overlay.mkdir()
    for entry in packages.iterdir():
        name = entry.name.lower()
        if name.endswith(".pth") or any(name == t or name.startswith(t + "-") for t in EXPORT_EXTRA_ENTRIES):
            continue
        (overlay / entry.name).symlink_to(entry)
    return overlay


def _run_child(overlay: Path, argv: list[str], stdin: str | None = None, **popen):
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{overlay}", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-S", "-c", CHILD, *argv]
    if popen:
        return subprocess.Popen(cmd, env=env, text=True, **popen)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, input=stdin)


def test_a_runtime_only_install_generates_chats_and_serves(tiny_bundle, tmp_path, capsys, monkeypatch):
    """``generate``, ``chat`` and ``serve`` on a bundle where the ``export`` extra (torch,
    transformers, safetensors, gguf, accelerate, huggingface_hub) is not installed: the same tokens
    and text as with it installed, none of its modules imported; ``export`` there says in one line
    how to install the extra."""
    import io

    import httpx
    from conftest import wait_for_server

    ckpt, bundle = tiny_bundle
    gen = ["--quiet", "generate", str(bundle), "--prompt", "Hello", "--max-new-tokens", "6", "--json"]
    capsys.readouterr()
    assert main(gen) == 0
    want = json.loads(capsys.readouterr().out)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\nAnd then?\n/exit\n"))
    chat = ["--quiet", "chat", str(bundle), "--max-new-tokens", "6"]
    assert main(chat) == 0
    want_chat = capsys.readouterr().out
    overlay = _runtime_only_site(tmp_path)

    r = _run_child(overlay, gen)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stderr.strip().splitlines()[-1]) == {"export_extra_imported": []}
    assert json.loads(r.stdout)["token_ids"] == want["token_ids"]

    r = _run_child(overlay, chat, stdin="Hello\nAnd then?\n/exit\n")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stderr.strip().splitlines()[-1]) == {"export_extra_imported": []}
    assert r.stdout == want_chat and want_chat.count("\n") == 2

    proc = _run_child(overlay, ["serve", str(bundle), "--port", "0", "--log-level", "warning"], stderr=subprocess.PIPE)
    try:
        url, _ = wait_for_server(proc)
        reply = httpx.post(url + "/v1/chat/completions", timeout=120, json={
            "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6, "temperature": 0}).json()
        assert reply["choices"][0]["message"]["content"] == want["text"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) in (0, 130)
        assert json.loads(proc.stderr.read().strip().splitlines()[-1]) == {"export_extra_imported": []}
    finally:
        proc.kill()
        proc.wait()

    r = _run_child(overlay, ["export", str(ckpt), "--out", str(tmp_path / "never")])
    assert r.returncode == 2 and "pip install 'qwen-ondevice[export]'" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "never").exists()


def test_rerunning_a_finished_export_says_it_is_complete(tiny_bundle, capsys):
    ckpt, out = tiny_bundle
    before = _files_sha(out)
    export(ExportOptions(model=str(ckpt), precision="fp32", prompt_length=AR, context_length=CL, num_parts=3, eval_tokens=256, eval_window=CL), out)
    err = capsys.readouterr().err
    assert "this bundle is complete" in err and "resuming the export" not in err
    assert _files_sha(out) == before


def test_footprint_counts_the_fidelity_reference_only_where_the_report_runs_it(tiny_factory):
    """The report stage's estimate holds the whole float32 model (4 bytes per parameter, counted
    from the config here) when the generation-fidelity slice runs, which it does only when that
    is at most half the memory available (export/report.py asks the same function)."""
    from qwen_ondevice.core.checkpoint import load_checkpoint
    from qwen_ondevice.core.parts import PartSpec
    from qwen_ondevice.export.footprint import estimate_footprint, fidelity_reference_fits

    cfg = load_checkpoint(str(tiny_factory(layers=3))).config
    parts = [PartSpec(1, 2, range(0, 0), embedding=True), PartSpec(2, 2, range(0, cfg.num_hidden_layers), head=True)]
    float_model = 4 * sum(p.numel() for p in _hf_params(cfg))

    def report(prompts: int, memory: int) -> int:
        return estimate_footprint(cfg, parts, precision="w4a16", prompt_length=AR, context_length=CL, calibration_tokens=256,
                                  eval_tokens=256, eval_window=8, compile=False, fidelity_prompts=prompts,
                                  memory_bytes=memory).stages["report"]

    big = 1 << 40
    assert fidelity_reference_fits(cfg, 2 * float_model) and not fidelity_reference_fits(cfg, 2 * float_model - 8)
    assert report(8, big) > report(0, big) and report(8, big) >= float_model
    assert report(8, 2 * float_model - 8) == report(0, 2 * float_model - 8)  # skipped there: not counted


def _hf_params(cfg):
    """transformers' own parameters of a Qwen2 model of this config (an independent count)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hf = Qwen2ForCausalLM(Qwen2Config(**{k: getattr(cfg, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "tie_word_embeddings")}))
    return list(hf.parameters())


def test_a_resume_with_other_options_is_refused_naming_them(tmp_path):
    """An export folder asked for other graph options (here one started when 4096 calibration tokens
    was the default) is left untouched, and the refusal names each option with both values, so the
    user can ask for the same and resume."""
    from dataclasses import asdict

    from qwen_ondevice.core.errors import UserError
    from qwen_ondevice.export.options import prepare_output

    old = asdict(ExportOptions(model="demo", calibration_tokens=4096))
    state = tmp_path / ".export" / "state.json"
    state.parent.mkdir()
    state.write_text(json.dumps({"options": old, "done": {"files": {}}}))
    before = state.read_text()
    with pytest.raises(UserError, match=r"calibration-tokens 4096 there, 8192 asked\); ask for the same to resume"):
        prepare_output(tmp_path, ExportOptions(model="demo", calibration_tokens=8192), force=False)
    assert state.read_text() == before
    assert prepare_output(tmp_path, ExportOptions(model="demo", calibration_tokens=4096), force=False).done == {"files": {}}
