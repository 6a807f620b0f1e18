"""Prefill and decode speed of the torch backend against ``transformers.generate()``, one run.

On the demo model (or any MODEL), with the same real-text prompt for both:

- ours: ``Engine(TorchBackend(ckpt, context_length=CL), prompt_length=AR)``; prefill is
  ``engine.prefill(prompt)`` plus the first greedy pick (time to first token); decode is the
  following ``new_tokens - 1`` greedy steps through the AR-1 graph (``engine.feed``).
- baseline: ``Qwen2ForCausalLM.generate(do_sample=False)`` in fp32; prefill is the time of
  ``max_new_tokens=1`` (time to first token); decode is the time of ``max_new_tokens=N`` minus
  that, over N - 1 tokens.

Each measurement is the best of ``--repeats`` runs after one warm-up. The table gives tokens/s
and the ratio ours/transformers (above 1: ours is faster).

    python benchmarks/bench_torch_backend.py            # demo model, 512-token prompt, 128 new
    python benchmarks/bench_torch_backend.py --context-length 1024 --repeats 3
    python benchmarks/bench_torch_backend.py --threads 1   # steadier on a machine shared with other jobs
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

DEFAULT_TEXT = os.environ.get("QWEN_ONDEVICE_TEXT", "/work/shared/data/wikitext-2/valid.txt")
STOP_IDS = (151645, 151643)


def best_of(fn, repeats: int):
    """(min seconds, last result) of ``repeats`` calls of ``fn``."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--text-file", default=DEFAULT_TEXT, help="real text for the prompt (default: WikiText-2 valid)")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--context-length", type=int, default=4096, help="CL of our static graphs (the CLI default)")
    ap.add_argument("--prompt-length", type=int, default=128, help="AR of our prompt processor")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads for both (default: torch's own choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from qwen_ondevice.core.checkpoint import load_checkpoint
    from qwen_ondevice.runtime.backends.torch_backend import TorchBackend
    from qwen_ondevice.runtime.engine import Engine

    ckpt = load_checkpoint(args.model)
    tok = ckpt.load_tokenizer()
    text = Path(args.text_file).read_text(encoding="utf-8")[: args.prompt_tokens * 20]
    prompt = tok.encode(text)[: args.prompt_tokens]
    if len(prompt) < args.prompt_tokens:
        sys.exit(f"{args.text_file} gives only {len(prompt)} tokens")
    N = args.new_tokens
    if args.prompt_tokens + N > args.context_length:
        sys.exit(f"prompt + new tokens ({args.prompt_tokens + N}) exceed --context-length {args.context_length}")

    engine = Engine(TorchBackend(ckpt, context_length=args.context_length), prompt_length=args.prompt_length)
    hf = ckpt.load_transformers_model()
    hf.generation_config.temperature = hf.generation_config.top_p = hf.generation_config.top_k = None

    def ours_first():
        engine.reset()
        return [int(np.argmax(engine.prefill(prompt)))]

    def ours_all():
        out = ours_first()
        while len(out) < N:
            out.append(int(np.argmax(engine.feed([out[-1]]))))
        return out

    ids = torch.tensor([prompt])

    def hf_gen(n):
        with torch.no_grad():
            seq = hf.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                pad_token_id=STOP_IDS[1],
            )
        return seq[0, len(prompt):].tolist()

    # warm-up (first calls allocate buffers, pick kernels)
    engine.reset()
    engine.prefill(prompt[:16])
    engine.feed([prompt[16]])
    with torch.no_grad():
        hf.generate(ids[:, :16], attention_mask=torch.ones(1, 16, dtype=torch.long), do_sample=False,
                    max_new_tokens=2, pad_token_id=STOP_IDS[1])

    o_ttft, _ = best_of(ours_first, args.repeats)
    o_total, o_tokens = best_of(ours_all, args.repeats)
    h_ttft, _ = best_of(lambda: hf_gen(1), args.repeats)
    h_total, h_tokens = best_of(lambda: hf_gen(N), args.repeats)

    rows = [
        (f"prefill tok/s ({len(prompt)}-token prompt)", len(prompt) / o_ttft, len(prompt) / h_ttft,
         (len(prompt) / o_ttft) / (len(prompt) / h_ttft)),
        (f"decode tok/s ({N} new, greedy)", (N - 1) / (o_total - o_ttft), (N - 1) / (h_total - h_ttft),
         ((N - 1) / (o_total - o_ttft)) / ((N - 1) / (h_total - h_ttft))),
    ]
    same = next((i for i, (a, b) in enumerate(zip(o_tokens, h_tokens)) if a != b), None)
    print(f"model {args.model} ({ckpt.config.num_hidden_layers} layers, hidden {ckpt.config.hidden_size}), fp32, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"ours: torch backend AR {engine.ar} / CL {args.context_length}; baseline: transformers "
          f"Qwen2ForCausalLM.generate(do_sample=False)")
    w = max(len(r[0]) for r in rows)
    print(f"| {'metric':<{w}} | {'ours':>10} | {'transformers':>12} | {'ours/transformers':>17} |")
    print(f"|{'-' * (w + 2)}|{'-' * 12}|{'-' * 14}|{'-' * 19}|")
    for name, a, b, r in rows:
        print(f"| {name:<{w}} | {a:>10.2f} | {b:>12.2f} | {r:>17.2f} |")
    print(f"time to first token: ours {o_ttft:.2f} s, transformers {h_ttft:.2f} s; "
          f"{N} tokens: ours {o_total:.2f} s, transformers {h_total:.2f} s")
    print("greedy tokens identical: " + ("yes" if same is None else f"no, first difference at token {same}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
