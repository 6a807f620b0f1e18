"""Host speed on the demo model, measured side by side in one run.

Prefill tokens/s (a 512-token real-text prompt) and decode tokens/s (128 greedy tokens) of:
this project's ONNX Runtime backend on each bundle given, `transformers` (fp32), and llama.cpp
(`llama-cpp-python` on the same GGUF file, when installed). Each is printed as a ratio to
llama.cpp (or to transformers when llama-cpp-python is missing). Each bundle is run twice: as the
backend runs it (exact host numerics, each call fed only the filled past slots), with the static
past of the device graphs (every call attends over the whole context length), and with
`--host-numerics fast` (int8 activation blocks inside the weight products).

    python benchmarks/bench_host_speed.py BUNDLE [BUNDLE ...] [--threads 2]

Bundles are made with `qwen-ondevice export demo --out DIR --precision fp32|fp16|w8a16|w4a16`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

PROMPT_TOKENS = 512
DECODE_TOKENS = 128


def _prompt_ids(tokenizer) -> list[int]:
    from qwen_ondevice.core.texts import default_evaluation_text, text_token_ids

    return text_token_ids(tokenizer, default_evaluation_text(), PROMPT_TOKENS, "benchmark")


def bench_engine(engine, ids: list[int]) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) of an Engine, greedy.

    One short prefill and decode step first open the backend's sessions (graph load, host
    rewrites): a start-up cost, like llama.cpp's model load, which is not timed either."""
    import numpy as np

    engine.prefill(ids[:8])
    engine.feed([ids[8]])
    engine.reset()
    t0 = time.perf_counter()
    logits = engine.prefill(ids)
    prefill = len(ids) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(DECODE_TOKENS):
        logits = engine.feed([int(np.argmax(logits))])
    decode = DECODE_TOKENS / (time.perf_counter() - t0)
    return prefill, decode


def bench_transformers(ckpt, ids: list[int]) -> tuple[float, float]:
    import torch

    model = ckpt.load_transformers_model()
    x = torch.tensor([ids])
    with torch.no_grad():
        t0 = time.perf_counter()
        model.generate(x, do_sample=False, max_new_tokens=1, min_new_tokens=1)
        t_prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(x, do_sample=False, max_new_tokens=DECODE_TOKENS + 1, min_new_tokens=DECODE_TOKENS + 1)
        t_all = time.perf_counter() - t0
    return len(ids) / t_prefill, DECODE_TOKENS / max(t_all - t_prefill, 1e-9)


def bench_llama_cpp(gguf: Path, ids: list[int], threads: int) -> tuple[float, float] | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(gguf), n_ctx=4096, n_threads=threads, verbose=False)
    t0 = time.perf_counter()
    llm.eval(ids)
    prefill = len(ids) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(DECODE_TOKENS):
        tok = llm.sample(temp=0.0)
        llm.eval([tok])
    decode = DECODE_TOKENS / (time.perf_counter() - t0)
    return prefill, decode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", nargs="*", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch

    from qwen_ondevice.core.checkpoint import load_checkpoint
    from qwen_ondevice.core.demo import demo_gguf
    from qwen_ondevice.runtime.open_model import open_runtime

    torch.set_num_threads(args.threads)
    ckpt = load_checkpoint("demo")
    ids = _prompt_ids(ckpt.load_tokenizer())
    rows = []
    lc = bench_llama_cpp(demo_gguf(), ids, args.threads)
    if lc:
        rows.append(("llama.cpp (Q4_K_M GGUF)", *lc))
    rows.append(("transformers fp32", *bench_transformers(ckpt, ids)))
    for b in args.bundles:
        # the backend's default, the static past of the device graphs, the fast host numerics
        for trim, numerics, label in ((True, "exact", ""), (False, "exact", ", static past"), (True, "fast", ", fast numerics")):
            rt = open_runtime(str(b), host_numerics=numerics)
            be = rt.engine.backend
            be.trim_past, be.intra_op_threads = trim, args.threads  # before its sessions open
            rows.append((f"ort-cpu {be.manifest.precision} ({b.name}){label}", *bench_engine(rt.engine, ids)))
            del rt, be
    base_name, base_p, base_d = rows[0]
    print(f"\nprefill: {PROMPT_TOKENS}-token prompt; decode: {DECODE_TOKENS} greedy tokens; {args.threads} threads; "
          f"ratios against {base_name}\n")
    print(f"{'engine':<40} {'prefill tok/s':>14} {'ratio':>7} {'decode tok/s':>13} {'ratio':>7}")
    for name, p, d in rows:
        print(f"{name:<40} {p:14.1f} {p / base_p:7.2f} {d:13.2f} {d / base_d:7.2f}")


if __name__ == "__main__":
    main()
