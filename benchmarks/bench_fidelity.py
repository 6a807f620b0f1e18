"""Generation fidelity of bundles against their float models, in one table with the one-token
metrics and the bytes each reads per token.

    .venv/bin/python benchmarks/bench_fidelity.py BUNDLE... [--prompts N] [--max-new-tokens 256]
        [--results FILE] [--float-activations REGEX]

For each bundle: ``evaluate --fidelity`` over the shipped prompt set (all 81 code tasks and 40 chat
prompts unless ``--prompts``; greedy, up to 256 new tokens; exact host numerics on ort-cpu),
with the perplexity ratio, top-1 agreement and KL of the bundle's own ``report.json`` and its bytes
per token (``core.bundle.bytes_per_token``). The float model's continuations are computed once per
float model and cached. ``--results FILE`` keeps each bundle's measurement (keyed by its path and
the prompt settings) so that a later run prints the table without measuring again.
``--float-activations REGEX`` runs the matching activations of every bundle in float on the host
(a diagnostic ablation: what their quantization costs; its one-token metrics are then measured
here, on the report's 2048 held-out tokens, not read from ``report.json``).
Every figure is measured on this host's ort-cpu simulation of the device numerics.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from qwen_ondevice.core.bundle import bytes_per_token, read_manifest  # noqa: E402
from qwen_ondevice.eval.evaluate import evaluate_bundle, evaluate_fidelity  # noqa: E402


def measure(bundle: Path, prompts: int | None, max_new_tokens: int, results: dict, key: str,
            float_activations: str | None, reference: str | None) -> dict:
    if key not in results:
        t0 = time.perf_counter()
        r = evaluate_fidelity(bundle, reference, prompts, max_new_tokens, float_activations=float_activations)
        results[key] = {**r.to_dict(), "wall_s": round(time.perf_counter() - t0, 1)}
        if float_activations:  # the report's one-token metrics are of the exact numerics: measure these
            acc = evaluate_bundle(bundle, tokens=2048, window=1024, float_activations=float_activations)
            results[key]["accuracy"] = acc.to_dict()
    return results[key]


def row(label: str, bundle: Path, f: dict) -> str:
    report = json.loads((bundle / "report.json").read_text()) if (bundle / "report.json").exists() else {}
    acc = f.get("accuracy") or report.get("accuracy", {})
    sizes = bytes_per_token(read_manifest(bundle, verify=False))
    c = f["code"]
    one_token = (f"{100 * (acc['perplexity_ratio'] - 1):+.2f}% | {100 * acc['top1_agreement']:.1f}% | {acc['mean_kl']:.4f}"
                 if acc else "- | - | -")
    return (f"| {label} | {one_token} | {100 * f['identical_share']:.1f}% | {f['prefix_median']:.0f} / {f['prefix_mean']:.1f} | "
            f"{c['float_passed']}/{c['tasks']} | {c['bundle_passed']}/{c['tasks']} "
            f"({100 * c['bundle_interval'][0]:.0f}-{100 * c['bundle_interval'][1]:.0f}%) | {c['only_float']} / {c['only_bundle']} | "
            f"{c['mcnemar_p']:.3g} | {sizes['weight_bytes_read_per_token'] / 1e6:.1f} MB |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundles", nargs="+", type=Path)
    ap.add_argument("--prompts", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--results", type=Path, default=None)
    ap.add_argument("--float-activations", default=None, metavar="REGEX")
    ap.add_argument("--reference", default=None, metavar="MODEL",
                    help="float model to compare with (default: each bundle's source); the off-grid model computes "
                         "the demo's function, so `--reference demo` reuses the demo's cached float continuations")
    args = ap.parse_args()
    results = json.loads(args.results.read_text()) if args.results and args.results.exists() else {}
    lines = ["| bundle | perplexity vs float | top-1 | KL | identical continuations | tokens before the first difference (median / mean) "
             "| code tasks, float | code tasks, bundle (95% CI) | only float / only bundle | McNemar p | weights read per token |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for b in args.bundles:
        key = f"{b.resolve()}|{args.prompts}|{args.max_new_tokens}" + (f"|float {args.float_activations}" if args.float_activations else "")
        f = measure(b, args.prompts, args.max_new_tokens, results, key, args.float_activations, args.reference)
        if args.results:
            args.results.write_text(json.dumps(results, indent=1))
        lines.append(row(b.name + (f", activations /{args.float_activations}/ float" if args.float_activations else ""), b, f))
        print(lines[-1], flush=True)
    print(f"\n{len(args.bundles)} bundles, {args.prompts or 'all'} prompts, up to {args.max_new_tokens} new tokens, greedy, "
          "ort-cpu exact host numerics\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
