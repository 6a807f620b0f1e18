"""The default export of a Qwen2-7B-shaped checkpoint on this machine, stage by stage, then
``generate`` from the bundle.

    PYTHONPATH=src python benchmarks/bench_export.py WORK [--layers 28] [--checkpoint CKPT] \
        [--context-length 4096] [--chipset snapdragon-8-elite] [--num-parts N] [--skip-generate] \
        [--export-arg=--no-rotate ...]

Writes the checkpoint (``make_qwen2_7b_checkpoint.py``, seeded random bf16 weights with the
published Qwen2-7B-Instruct config; ``--layers`` fewer for a 7B-wide slice) into WORK once, runs
``qwen-ondevice export`` with its defaults (w4a16, CL 4096, AR 128, 4096 calibration tokens, the
accuracy report, snapdragon-8-elite binaries) in a child process, and prints:
- the part plan and the export's estimate of its own footprint (``footprint.py``);
- per stage: wall time, peak RSS (sampled by the export's stage meters; the compile's is the
  compiler child's own) and bytes written; the whole export's wall time and peak RSS (the
  child's ``ru_maxrss``) against the targets of 20 GB and 2 hours;
- per part: weight bytes, context binary size, compile time and peak RSS;
- bytes read per generated token at full context (the .bin files, one embedding row, the KV
  cache: ``core.bundle.bytes_per_token``), against AI Hub's Qwen2-7B-Instruct (about 4.1 GB,
  computed from its published .bin files);
- ``generate`` from the bundle on the host (``ort-cpu``): peak RSS, time to first token, tokens/s.
Random weights: only time, memory and sizes mean anything here, not the text or the accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = str(ROOT / "src")
TARGET_RSS = 20e9
TARGET_SECONDS = 2 * 3600
#: AI Hub's Qwen2-7B-Instruct, computed from its four published context binaries (5.06 GB): minus
#: the 16-bit embedding (152064 x 3584 x 2 B = 1.09 GB) of which decode reads one row (7 KB),
#: plus the uint8 KV cache at CL 4096 (28 layers x 2 x 4 heads x 128 x 4096 B = 0.117 GB).
AI_HUB_BYTES_PER_TOKEN = 5.06e9 - 152064 * 3584 * 2 + 3584 * 2 + 28 * 2 * 4 * 128 * 4096


def _run(cmd: list[str], log: Path) -> tuple[int, float, int]:
    """Run ``cmd`` with its output in ``log``; returns (exit code, wall seconds, the child's own
    peak RSS bytes: ``os.wait4``'s ru_maxrss of that child, not the maximum over all children)."""
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - t0, usage.ru_maxrss * 1024


def _gb(x) -> str:
    return f"{x / 1e9:.2f} GB" if x else "-"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", type=Path, help="folder for the checkpoint, the bundle and the logs")
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--checkpoint", type=Path, default=None, help="export this checkpoint instead of the 7B-shaped one")
    ap.add_argument("--context-length", type=int, default=4096)
    ap.add_argument("--chipset", default="snapdragon-8-elite")
    ap.add_argument("--num-parts", type=int, default=None)
    ap.add_argument("--skip-generate", action="store_true")
    ap.add_argument("--export-arg", action="append", default=[], metavar="ARG",
                    help="one more option for export, repeatable (e.g. --export-arg=--no-rotate)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    ckpt = args.checkpoint or args.work / f"qwen2-7b-shaped-{args.layers}l"
    if not (ckpt / "model.safetensors.index.json").exists() and args.checkpoint is None:
        code, sec, _ = _run([sys.executable, str(ROOT / "benchmarks" / "make_qwen2_7b_checkpoint.py"), str(ckpt),
                             "--layers", str(args.layers)], args.work / "checkpoint.log")
        if code:
            print(f"making the checkpoint failed, see {args.work / 'checkpoint.log'}")
            return 1
        print(f"checkpoint {ckpt} written in {sec:.0f} s")
    bundle = args.work / "bundle"
    cmd = [sys.executable, "-m", "qwen_ondevice.cli.main", "export", str(ckpt), "--out", str(bundle),
           "--context-length", str(args.context_length), "--chipset", args.chipset]
    if args.num_parts:
        cmd += ["--num-parts", str(args.num_parts)]
    cmd += args.export_arg
    print("$ " + " ".join(cmd[1:]))
    code, seconds, peak = _run(cmd, args.work / "export.log")
    log_text = (args.work / "export.log").read_text(errors="replace")
    for line in log_text.splitlines():
        if line.startswith(("[plan]", "  part_", "[fit]", "  float", "  calibration", "  quantization", "  compile", "  report")):
            print(line)
    if code:
        print(f"export failed (exit {code}) after {seconds:.0f} s, peak RSS {_gb(peak)}; see {args.work / 'export.log'}")
        return 1

    state = json.loads((bundle / ".export" / "state.json").read_text())["done"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    print(f"\n{'stage':<28} {'wall time':>10} {'peak RSS':>10} {'written':>10}")
    for name, info in state.items():
        if isinstance(info, dict) and ("seconds" in info or "compile_seconds" in info):
            sec = info.get("seconds", info.get("compile_seconds"))
            print(f"{name:<28} {sec:>9.1f}s {_gb(info.get('peak_rss_bytes')):>10} {_gb(info.get('written_bytes')):>10}")
    print(f"{'export (whole process)':<28} {seconds:>9.1f}s {_gb(peak):>10}   targets: "
          f"RSS {'<=' if peak <= TARGET_RSS else '>'} 20 GB, time {'<=' if seconds <= TARGET_SECONDS else '>'} 2 h")

    est = re.search(r"estimated peak RSS ([0-9.]+) GB", log_text)
    if est:
        print(f"{'estimate (footprint.py)':<28} {'':>10} {float(est.group(1)):>7.2f} GB   "
              f"{'holds' if peak <= float(est.group(1)) * 1e9 else 'EXCEEDED by the measured peak'}")
    head = manifest["parts"][-1]
    logits = next(o for o in head["graphs"][str(manifest["ar"][0])]["outputs"] if o["name"] == "logits")
    untied = "lm_head.weight" in head.get("weights", {}) and not manifest["model"]["config"].get("tie_word_embeddings")
    print(f"logits {tuple(logits['shape'])} from {head['name']}; untied lm_head quantized in the head part: {untied}")

    qnn = manifest.get("qnn", {}).get("parts", [])
    print(f"\n{'part':<14} {'layers':>8} {'weights':>10} {'.bin':>10} {'compile':>9} {'compile RSS':>12}")
    for p in manifest["parts"]:
        q = next((x for x in qnn if x["name"] == p["name"]), {})
        size = (bundle / q["bin"]).stat().st_size if q.get("bin") else 0
        layers = f"{p['layers'][0]}-{p['layers'][1] - 1}" if p["layers"][1] > p["layers"][0] else "-"
        print(f"{p['name']:<14} {layers:>8} {_gb(p['weight_bytes']):>10} {_gb(size):>10} "
              f"{q.get('compile_seconds', 0):>8.0f}s {_gb(q.get('peak_rss_bytes')):>12}")
    sys.path.insert(0, SRC)
    from qwen_ondevice.core.bundle import bytes_per_token, read_manifest

    sizes = bytes_per_token(read_manifest(bundle, verify=False))
    print(f"\nbytes read per generated token (weights counted from the {sizes['weights_counted_from']}; "
          f"the embedding part one row):")
    for p in sizes["parts"]:
        print(f"  {p['name']:<14} device {_gb(p['device_bytes']):>10}  read per token {_gb(p['read_per_token']):>10}  "
              f"(ONNX data {_gb(p['onnx_data_bytes'])})")
    weights, kv = sizes["weight_bytes_read_per_token"], sizes["kv_cache_bytes_full_context"]
    per_token = sizes["bytes_per_token_full_context"]
    print(f"at CL {manifest['context_length']}: {_gb(weights)} weights + {_gb(kv)} KV = {_gb(per_token)} "
          f"({per_token / AI_HUB_BYTES_PER_TOKEN:.2f}x AI Hub's {AI_HUB_BYTES_PER_TOKEN / 1e9:.2f} GB, computed from its .bin files)\n")

    if not args.skip_generate:
        gen = [sys.executable, "-m", "qwen_ondevice.cli.main", "--quiet", "generate", str(bundle), "--prompt", "Tell me about the sea.",
               "--max-new-tokens", "16", "--temperature", "0", "--json"]
        code, sec, gpeak = _run(gen, args.work / "generate.log")
        if code:
            print(f"generate failed (exit {code}); see {args.work / 'generate.log'}")
            return 1
        out = (args.work / "generate.log").read_text()
        t = json.loads(out[out.index("{"):])["timings"]
        print(f"generate (ort-cpu): peak RSS {_gb(gpeak)}, time to first token {t['time_to_first_token_s']:.2f} s "
              f"({t['prompt_tokens']} prompt tokens), {t['generation_tokens_per_s']:.2f} tokens/s, {sec:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
