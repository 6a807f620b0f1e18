"""Peak RSS of quantizing Qwen2-7B's widest tensors: the lm_head (int8 per output channel, MSE
clipping search) and the embedding table (int8 per row), each in a fresh child process.

    PYTHONPATH=src python benchmarks/bench_quant_memory.py [--vocab 152064] [--hidden 3584]

Baseline (named, measured in the same run): the whole tensor in one pass (``column_block`` = all
output channels; the embedding rounded as one block), which is what the export did before the
column/row blocks. Rows: wall time, peak RSS, and what the quantization added to the process's
peak (the weight itself and the libraries already loaded) in multiples of the weight's float32 bytes.
The weights are random (normal, std 0.02), so only time and memory mean anything here.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")

CHILD = r"""
import json, resource, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
spec = json.loads(sys.argv[2])
V, H = spec["vocab"], spec["hidden"]
from qwen_ondevice.quantize.qdq import int8_rows
from qwen_ondevice.quantize.weight_quant import quantize_weight
w = np.random.default_rng(0).standard_normal((V, H), dtype=np.float32)
w *= 0.02  # (V, H) as stored
if spec["what"] == "lm_head":
    w = np.ascontiguousarray(w.T)  # the graph's MatMul layout (H, V), as the export reads it
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t0 = time.perf_counter()
if spec["what"] == "lm_head":
    q = quantize_weight(w, 8, np.ones(H, np.float32), column_block=V if spec["one_pass"] else None)
else:
    q = int8_rows(w, rows_per_block=V if spec["one_pass"] else 8192)
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": seconds, "peak": peak, "before": base}))
"""


def run(what: str, one_pass: bool, vocab: int, hidden: int) -> dict:
    spec = json.dumps({"what": what, "one_pass": one_pass, "vocab": vocab, "hidden": hidden})
    out = subprocess.run([sys.executable, "-c", CHILD, SRC, spec], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=152064)
    ap.add_argument("--hidden", type=int, default=3584)
    args = ap.parse_args()
    weight_gb = args.vocab * args.hidden * 4 / 1e9
    print(f"tensor ({args.vocab} x {args.hidden}) float32: {weight_gb:.2f} GB")
    print(f"{'tensor':<10} {'how':<28} {'seconds':>8} {'peak RSS GB':>12} {'added / weight':>15} {'added vs one pass':>18}")
    for what in ("lm_head", "embedding"):
        rows = {how: run(what, how == "one pass (baseline)", args.vocab, args.hidden)
                for how in ("one pass (baseline)", "blocks (the export now)")}
        added = {how: r["peak"] - r["before"] for how, r in rows.items()}
        for how, r in rows.items():
            print(f"{what:<10} {how:<28} {r['seconds']:>8.1f} {r['peak'] / 1e9:>12.2f} {added[how] / 1e9 / weight_gb:>15.2f} "
                  f"{added[how] / max(added['one pass (baseline)'], 1):>18.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
