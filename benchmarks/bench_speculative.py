"""Speculative decoding on a bundle, with prompt lookup or a draft model (``--draft MODEL``): tokens
per target forward, host speedup, and the projected Snapdragon 8 Elite decode rate of the Qwen2-7B
bundle, in one table.

Three workloads built from text the package ships, greedy, ``--max-new-tokens`` (128) each:

- ``code-edit``: a shipped code task's reference function (``data/code_tasks.json``) to change
  (a docstring, type hints, clearer names, comments) and return whole;
- ``summary``: a question or a summary over a WikiText-2 test passage (``data/wikitext2_test.txt``);
- ``chat``: open questions with nothing to copy from (written here).

For each workload and each drafter setting the script measures (one run, same bundle, same
prompts): generated tokens, target forwards after the prefill (AR-1 and verify calls), drafted and
accepted tokens, and the host decode wall time against plain AR-1 decoding. Greedy speculative
decoding gives exactly the tokens of one-token-per-call decoding through the verify graph (the
tests check that bitwise); the table also counts the prompts whose tokens equal plain AR-1
decoding's, which may differ where the two graphs round differently.

The projection for Qwen2-7B on Snapdragon 8 Elite takes the measured counts (verify and AR-1 calls
per token) and a cost model of one forward over N tokens:

    t(N) = B / W + (N - 1) * c

- B, bytes read per token: the 7B bundle's .bin bytes as ``docs/numerics.md`` counts them
  (4.13 GB for the default, int8 v_proj/o_proj with an int4 lm_head, measured from the .bin files
  of the 28-layer export; 4.16 GB all int4 with an int8 lm_head, computed from the .bin fit);
  ``--bytes`` overrides.
- W, the bandwidth decode achieves: AI Hub's published 13.65 tok/s for Qwen2-7B-Instruct on
  Snapdragon 8 Elite times its 4.09 GB read per token (computed from its published .bin files)
  = 55.8 GB/s, two thirds of the chip's 84.8 GB/s peak.
  AI Hub's measured decode time holds the compute of one token, so t(1) = B / W scales it by
  the bytes read.
- c, the cost of each further token in a forward: from t(128) = 128 / R, c = (128 / R - B / W) / 127,
  with R the prompt processor's tokens/s (AR-128). No AI Hub prefill rate for Qwen2-7B is
  available offline, so R is an assumption, ``--prefill-tps`` (default 500), and the table shows
  the projection at R / 2 too.

The roofline is W_peak / B: 84.8 GB/s over the bundle's bytes per token (one token per weight read).

    python benchmarks/bench_speculative.py BUNDLE [--prompts 10] [--draft-tokens 2,4,7]
        [--host-numerics exact,fast] [--max-new-tokens 128] [--draft lookup|MODEL]

With ``--draft MODEL`` (a bundle or a checkpoint with the target's tokenizer) the draft model
proposes the k tokens, one draft forward per drafted token, each projected to cost D / W with D
the draft's bytes per token: ``--draft-bytes``, by default what a draft bundle's own .bin files
and KV cache give (``core.bundle.bytes_per_token``, the figure of its ``report.json``; the demo's
w4a16 bundle is a Qwen2-0.5B-sized model, the natural draft of Qwen2-7B).

BUNDLE needs a verify graph able to take the largest k: ``qwen-ondevice export demo --out DIR
--verify-tokens 7``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field

#: AI Hub's Qwen2-7B-Instruct on Snapdragon 8 Elite: published decode rate, tokens/s.
AI_HUB_TPS = 13.65
#: AI Hub's bytes read per decoded token, computed from its published .bin files (docs/numerics.md).
AI_HUB_BYTES = 4.09e9
#: Snapdragon 8 Elite peak memory bandwidth, bytes/s (Qualcomm's LPDDR5X-5300 figure).
PEAK_BANDWIDTH = 84.8e9
#: What our Qwen2-7B bundle reads per token (docs/numerics.md): the default measured from the .bin
#: files of the 28-layer export, all int4 computed from the measured .bin fit.
BUNDLE_BYTES = {"default (int8 v/o, int4 lm_head)": 4.13e9, "all int4 (--int8-projections none --lm-head int8)": 4.16e9}
PROMPT_PROCESSOR_AR = 128

EDITS = (
    "Add a docstring that explains the parameters and the return value.",
    "Add type hints to every parameter and to the return value.",
    "Rename the local variables to clearer names.",
    "Add a short comment above each block of lines.",
)
SUMMARY_TEMPLATES = (
    "Summarize the following passage in three sentences, keeping its names and numbers.\n\n{passage}",
    "Answer from the passage only: who or what is it about, and what happened? Quote the passage where you can.\n\n{passage}",
)
CHAT_QUESTIONS = (
    "What are three good habits for getting better sleep?",
    "Explain what a hash table is to a new programmer.",
    "Suggest a plan for a weekend trip to the mountains.",
    "Why is the sky blue? Answer briefly.",
    "Write a short poem about autumn leaves.",
    "What should I consider when adopting a dog?",
    "Give me tips for learning a new language as an adult.",
    "How do vaccines train the immune system?",
    "Describe the water cycle in simple terms.",
    "What makes a good team meeting?",
    "Compare trains and planes for a 500 km journey.",
    "How can I reduce the energy use of my home?",
)


def workloads(n: int) -> dict[str, list[list[dict]]]:
    """``n`` chat prompts (message lists) per workload, deterministic."""
    from qwen_ondevice.eval.code_tasks import load_code_tasks
    from qwen_ondevice.eval.fidelity import chat_passages

    tasks = load_code_tasks(n)
    code = [[{"role": "user", "content": f"Here is a Python function.\n\n```python\n{t.prompt}{t.solution}```\n\n"
                                          f"{EDITS[i % len(EDITS)]} Return the whole function."}]
            for i, t in enumerate(tasks)]
    summary = [[{"role": "user", "content": SUMMARY_TEMPLATES[i % len(SUMMARY_TEMPLATES)].format(passage=p)}]
               for i, p in enumerate(chat_passages(n))]
    if n > len(CHAT_QUESTIONS):
        raise SystemExit(f"--prompts {n}: the chat workload has {len(CHAT_QUESTIONS)} questions")
    chat = [[{"role": "user", "content": q}] for q in CHAT_QUESTIONS[:n]]
    return {"code-edit": code, "summary": summary, "chat": chat}


@dataclass
class Tally:
    """Sums over one workload's prompts for one setting."""

    tokens: int = 0
    calls: int = 0
    verify_calls: int = 0
    drafted: int = 0
    accepted: int = 0
    seconds: float = 0.0
    outputs: list = field(default_factory=list)

    def add(self, result, seconds: float) -> None:
        s = result.speculation
        self.tokens += max(len(result.token_ids) - 1, 0)  # the first token comes from the prefill
        self.calls += s["target_calls"]
        self.verify_calls += s["verify_calls"]
        self.drafted += s["drafted_tokens"]
        self.accepted += s["accepted_tokens"]
        self.seconds += seconds
        self.outputs.append(result.token_ids)

    @property
    def per_forward(self) -> float:
        return self.tokens / self.calls if self.calls else 0.0


def run(engine, tokenizer, prompts: list[list[int]], k: int | None, max_new: int, new_drafter=None) -> Tally:
    """Greedy decoding of each prompt, plain (``k`` None) or speculative with ``new_drafter(params)``
    (``runtime.speculative.drafter_factory``) drafting ``k``."""
    from qwen_ondevice.runtime.generate import generate
    from qwen_ondevice.runtime.sampling import SamplingParams

    tally = Tally()
    for ids in prompts:
        t0 = time.perf_counter()
        r = generate(engine, tokenizer, ids, max_new_tokens=max_new,
                     drafter=None if k is None else new_drafter(SamplingParams()), draft_tokens=k or 1)
        prefill = len(ids) / r.prompt_tps if r.prompt_tps else 0.0
        tally.add(r, time.perf_counter() - t0 - prefill)  # decode time: the prefill is alike in both
    return tally


def forward_seconds(n: int, bytes_per_token: float, prefill_tps: float) -> float:
    """t(N) = B / W + (N - 1) * c of the module docstring, seconds."""
    weights = bytes_per_token / (AI_HUB_TPS * AI_HUB_BYTES)
    per_token = max((PROMPT_PROCESSOR_AR / prefill_tps - weights) / (PROMPT_PROCESSOR_AR - 1), 0.0)
    return weights + (n - 1) * per_token


def projected_tps(t: Tally, k: int | None, bytes_per_token: float, prefill_tps: float, draft_bytes: float = 0.0) -> float:
    """Projected 7B decode tokens/s from the measured calls: verify calls at AR-(k+1), the rest AR-1,
    and one draft forward of ``draft_bytes`` / W per drafted token (0 for prompt lookup)."""
    if not t.calls:
        return 0.0
    ar1 = t.calls - t.verify_calls
    secs = ar1 * forward_seconds(1, bytes_per_token, prefill_tps)
    if k is not None:
        secs += t.verify_calls * forward_seconds(k + 1, bytes_per_token, prefill_tps)
    secs += t.drafted * draft_bytes / (AI_HUB_TPS * AI_HUB_BYTES)
    return t.tokens / secs


def draft_bytes_per_token(draft: str, given: float | None) -> float:
    """The draft's bytes per token on the device: ``given``, else a draft bundle's own count, else 0
    (prompt lookup reads nothing)."""
    from pathlib import Path

    from qwen_ondevice.core.bundle import MANIFEST, bytes_per_token, read_manifest

    if given is not None:
        return given
    if draft == "lookup":
        return 0.0
    if not (Path(draft) / MANIFEST).is_file():
        raise SystemExit(f"--draft {draft}: not a bundle, so its bytes per token are unknown; pass --draft-bytes")
    return float(bytes_per_token(read_manifest(Path(draft), verify=False))["bytes_per_token_full_context"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--prompts", type=int, default=10, help="prompts per workload")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--draft-tokens", default="2,4,7", help="comma-separated k values for prompt lookup")
    ap.add_argument("--host-numerics", default="exact,fast", help="comma-separated: exact, fast")
    ap.add_argument("--prefill-tps", type=float, default=500.0,
                    help="assumed Qwen2-7B prompt-processor tokens/s on Snapdragon 8 Elite (compute term)")
    ap.add_argument("--draft", default="lookup", help="lookup (prompt lookup, the default) or MODEL: a draft model "
                    "(bundle or checkpoint) with the target's tokenizer")
    ap.add_argument("--draft-bytes", type=float, default=None,
                    help="the draft's bytes per token on the device (default: a draft bundle's own count)")
    ap.add_argument("--bytes", type=float, default=None, help="7B bytes per token to project with (default: both of docs/numerics.md)")
    args = ap.parse_args()

    from qwen_ondevice.runtime.open_model import open_runtime
    from qwen_ondevice.runtime.speculative import drafter_factory

    ks = [int(x) for x in args.draft_tokens.split(",") if x]
    draft_b = draft_bytes_per_token(args.draft, args.draft_bytes)
    sizes = {"given": args.bytes} if args.bytes else BUNDLE_BYTES
    rows = []
    for numerics in [x for x in args.host_numerics.split(",") if x]:
        rt = open_runtime(args.bundle, host_numerics=numerics)
        if rt.engine.verify_ar is None or rt.engine.verify_ar - 1 < max(ks):
            raise SystemExit(f"{args.bundle}: its verify graph takes {None if rt.engine.verify_ar is None else rt.engine.verify_ar - 1} "
                             f"drafted tokens, k up to {max(ks)} asked; export it with --verify-tokens {max(ks)}")
        new_drafter = drafter_factory(args.draft, rt.engine.config.vocab_size, rt.engine.context_length)
        for name, messages in workloads(args.prompts).items():
            prompts = [rt.tokenizer.apply_chat_template(m) for m in messages]
            print(f"[{numerics}] {name}: plain", file=sys.stderr, flush=True)
            plain = run(rt.engine, rt.tokenizer, prompts, None, args.max_new_tokens)
            for k in ks:
                print(f"[{numerics}] {name}: {args.draft} k={k}", file=sys.stderr, flush=True)
                spec = run(rt.engine, rt.tokenizer, prompts, k, args.max_new_tokens, new_drafter)
                same = sum(a == b for a, b in zip(spec.outputs, plain.outputs))
                rows.append((numerics, name, k, plain, spec, same))

    drafter = "Prompt lookup" if args.draft == "lookup" else f"Draft model {args.draft}"
    print(f"\n{drafter} on {args.bundle}, {args.prompts} prompts per workload, greedy, up to "
          f"{args.max_new_tokens} new tokens; host rates measured on this machine (ort-cpu), 7B rates projected\n")
    cols = ["numerics", "workload", "k", "tokens/forward", "accepted/drafted", "host speedup", "same as AR-1"]
    for label, b in sizes.items():
        cols += [f"7B tok/s, {label}, R={args.prefill_tps:g}", f"R={args.prefill_tps / 2:g}"]
    print("| " + " | ".join(cols) + " |")
    print("|" + " --- |" * len(cols))
    for numerics, name, k, plain, spec, same in rows:
        speed = (plain.seconds / spec.seconds) if spec.seconds else 0.0
        cells = [numerics, name, str(k), f"{spec.per_forward:.2f}", f"{spec.accepted}/{spec.drafted}", f"{speed:.2f}x",
                 f"{same}/{len(plain.outputs)}"]
        for b in sizes.values():
            cells += [f"{projected_tps(spec, k, b, args.prefill_tps, draft_b):.1f}",
                      f"{projected_tps(spec, k, b, args.prefill_tps / 2, draft_b):.1f}"]
        print("| " + " | ".join(cells) + " |")
    print()
    for label, b in sizes.items():
        plain_tps = 1.0 / forward_seconds(1, b, args.prefill_tps)
        print(f"7B {label}: {b / 1e9:.2f} GB per token; plain decode projected {plain_tps:.1f} tok/s "
              f"(AI Hub measured {AI_HUB_TPS} tok/s at {AI_HUB_BYTES / 1e9:.2f} GB); roofline {PEAK_BANDWIDTH / b:.1f} tok/s")
    if draft_b:
        print(f"Draft: {draft_b / 1e9:.3f} GB per token, one draft forward of {draft_b / 1e9:.3f} GB / W per drafted token")
    print("Cost model: t(N) = B / W + (N - 1) c, W = 13.65 tok/s x 4.09 GB = "
          f"{AI_HUB_TPS * AI_HUB_BYTES / 1e9:.1f} GB/s (AI Hub's achieved rate), c = (128/R - B/W) / 127, R assumed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
