"""Rebuild the off-grid test model: the demo model with a random orthogonal rotation of its residual
stream folded into the weights (``quantize/rotation.py``), offline, in about a minute.

    .venv/bin/python benchmarks/make_offgrid_model.py OUT [--seed 0] [--source demo]

Why: the demo's weights come from a Q4_K_M GGUF and sit on llama.cpp's 4-bit block grid, which
flatters block-wise int4; a real bf16 checkpoint (Qwen2-7B-Instruct) sits on no grid. The rotated
model computes the same function as the demo (exact in float: checked here against transformers'
logits of both), while every projection becomes a mix of all H rows or columns of the original
and leaves the grid (checked here: distinct values per block of 32 weights of one input row).
Accuracy figures of the project are reported on both models.

Exactly specified: Q = the Haar-random orthogonal matrix of ``random_orthogonal(896, seed)``
(numpy ``default_rng(seed)``, QR with R's diagonal signs), float64 arithmetic, float32 weights.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from qwen_ondevice.core.checkpoint import load_checkpoint  # noqa: E402
from qwen_ondevice.core.files import sha256_file  # noqa: E402
from qwen_ondevice.quantize.rotation import rotate_checkpoint  # noqa: E402

#: A chat prompt of the demo's template, for the float check.
CHECK_PROMPT = "Write a Python function that returns the n-th Fibonacci number."
GRID_TENSOR = "model.layers.11.mlp.down_proj.weight"  # Q4_K in the demo GGUF (most others are Q5_0, Q6_K, Q8_0)


def distinct_per_block(w: np.ndarray, block: int = 32) -> float:
    """Median number of distinct values among ``block`` consecutive input weights of one output
    row (w: (out, in)): at most 16 on a 4-bit grid, ``block`` off it."""
    rows = w[:, : w.shape[1] // block * block].reshape(w.shape[0], -1, block)[:256]
    return float(np.median([len(np.unique(b)) for r in rows for b in r]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--source", default="demo", help="MODEL to rotate (default: demo)")
    args = ap.parse_args()
    import torch
    from safetensors import safe_open
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    src = load_checkpoint(args.source)
    t0 = time.perf_counter()
    rotate_checkpoint(src.path, args.out, args.seed)
    print(f"rotated {src.path} -> {args.out} in {time.perf_counter() - t0:.0f} s (seed {args.seed})")

    def weight(folder: Path, name: str) -> np.ndarray:
        f = next(p for p in sorted(folder.glob("*.safetensors")) if name in safe_open(str(p), "np").keys())
        return safe_open(str(f), "np").get_tensor(name)

    before, after = distinct_per_block(weight(src.path, GRID_TENSOR)), distinct_per_block(weight(args.out, GRID_TENSOR))
    print(f"{GRID_TENSOR}: median distinct values per block of 32 inputs: {before:.0f} before, {after:.0f} after")

    tok = AutoTokenizer.from_pretrained(str(src.path))
    ids = tok.apply_chat_template([{"role": "user", "content": CHECK_PROMPT}], add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    logits = []
    for folder in (src.path, args.out):
        model = Qwen2ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            logits.append(model(ids).logits[0].numpy())
        del model
    diff = float(np.abs(logits[0] - logits[1]).max())
    same = bool((logits[0].argmax(-1) == logits[1].argmax(-1)).all())
    print(f"transformers float32 logits over a {ids.shape[1]}-token chat prompt: max |difference| {diff:.2e} "
          f"(logits up to {np.abs(logits[0]).max():.1f}), next-token argmax identical at every position: {same}")
    for f in sorted(args.out.glob("*.safetensors")):
        print(f"{f.name}: sha256 {sha256_file(f)}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
