"""Where a bundle's free-running text first leaves the float model's: how decided was the float
model there?

For each prompt of a `bench_fidelity.py` run (its `--results` file), the float model is run once,
teacher-forced, over the prompt and its own greedy continuation (the cached float continuations of
`evaluate --fidelity`), giving at every generated position the margin between its top two logits.
The positions where a bundle's continuation first differs are then compared with all positions:
if the bundle mostly departs where the float model itself hesitates (small margins), the loss is
the quantization noise tipping near-ties, and a one-token metric cannot see it.

    python benchmarks/fidelity_divergence.py RESULTS.json [--model demo]

The float model is `transformers`' Qwen2ForCausalLM (float32), independent of the code under test.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

#: Logit margins (top-1 minus top-2) reported as shares: below these, the float model hesitates.
MARGINS = (0.5, 1.0, 2.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="the --results JSON of benchmarks/bench_fidelity.py")
    ap.add_argument("--model", default="demo", help="the float model the runs were compared with")
    args = ap.parse_args()

    import torch

    from qwen_ondevice.core.checkpoint import load_checkpoint
    from qwen_ondevice.eval.fidelity import fidelity_prompts, reference_continuations, token_limits

    results = json.loads(open(args.results).read())
    runs = {k: v for k, v in results.items() if v.get("rows")}
    n = max(len(v["rows"]) for v in runs.values())
    max_new = {v["max_new_tokens"] for v in runs.values()}
    if len(max_new) != 1:
        raise SystemExit(f"runs with different --max-new-tokens: {sorted(max_new)}")
    ckpt = load_checkpoint(args.model)
    tok = ckpt.load_tokenizer()
    prompts = fidelity_prompts(n)
    ids = [tok.apply_chat_template(p.messages) for p in prompts]
    limits = token_limits(ids, max_new.pop(), 4096)
    cont = reference_continuations(args.model, ids, limits)  # cached by evaluate --fidelity
    model = ckpt.load_transformers_model()
    margins = []  # per prompt: the float margin at each generated position
    with torch.no_grad():
        for p, c in zip(ids, cont):
            logits = model(torch.tensor([p + c])).logits[0, len(p) - 1 : len(p) + len(c) - 1].float()
            top = torch.topk(logits, 2, dim=-1).values
            margins.append((top[:, 0] - top[:, 1]).numpy())
    everywhere = np.concatenate(margins)

    def shares(x: np.ndarray) -> str:
        return " / ".join(f"{(x < m).mean():.0%}" for m in MARGINS)

    print(f"\nFloat top-1 minus top-2 logit margin: at every generated position vs where a bundle first departs "
          f"({len(ids)} prompts; shares below {' / '.join(map(str, MARGINS))})\n")
    print("| positions | count | median margin | share below |")
    print("| --- | --- | --- | --- |")
    print(f"| every generated position (float) | {len(everywhere)} | {np.median(everywhere):.2f} | {shares(everywhere)} |")
    for key, run in runs.items():
        at = np.array([margins[i][r["prefix"]] for i, r in enumerate(run["rows"])
                       if not r["identical"] and r["prefix"] < len(margins[i])])
        name = key.split("|")[0].rstrip("/").split("/")[-1]
        print(f"| first departure, {name} | {len(at)} | {np.median(at):.2f} | {shares(at)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
