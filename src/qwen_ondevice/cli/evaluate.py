"""``qwen-ondevice evaluate BUNDLE``: perplexity, top-1 agreement and KL against the float model, and
(``--fidelity``) what the bundle writes when it runs free: identical greedy continuations and code
tasks passed."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qwen_ondevice.cli.args import add_host_numerics_arg
from qwen_ondevice.eval.evaluate import DEFAULT_EVAL_TOKENS, DEFAULT_WINDOW
from qwen_ondevice.eval.fidelity import DEFAULT_MAX_NEW_TOKENS


def register(sub) -> None:
    """Add ``evaluate`` to the CLI's subparsers."""
    p = sub.add_parser("evaluate", help="perplexity, top-1 agreement and KL of a bundle against the float model; "
                                        "--fidelity: what it writes when it runs free")
    p.add_argument("bundle", type=Path, metavar="BUNDLE")
    p.add_argument("--reference", default=None, help="float MODEL to compare with (default: the model the bundle was exported from)")
    p.add_argument("--text", default=None, help="held-out text file (default: WikiText-2 test, shipped)")
    p.add_argument("--tokens", type=int, default=DEFAULT_EVAL_TOKENS, help="held-out tokens to score (0: skip perplexity)")
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW)
    p.add_argument("--backend", choices=["ort-cpu", "qnn-htp"], default="ort-cpu")
    add_host_numerics_arg(p)
    p.add_argument("--by-position", type=int, default=None, metavar="N",
                   help="also report the metrics per N positions of the window (e.g. 1024 with --window 4096: "
                        "whether the accuracy holds deep into the context)")
    p.add_argument("--fidelity", action="store_true",
                   help="also measure generation fidelity: greedy continuations of the shipped code tasks and chat "
                        "prompts by the bundle and the float model (identical share, tokens before the first "
                        "difference, code tasks passed with a McNemar test)")
    p.add_argument("--fidelity-prompts", type=int, default=None, metavar="N",
                   help="the first N prompts of the fidelity set (default: all, 81 code tasks and 40 chat prompts)")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                   help=f"fidelity: new tokens per continuation at most (default {DEFAULT_MAX_NEW_TOKENS})")
    p.add_argument("--skip-tokens", type=int, default=0, metavar="N",
                   help="start scoring N tokens into the text (e.g. to score the tokens a deep window sees "
                        "at depth 3072 at the start of a window instead)")
    p.add_argument("--details", type=Path, default=None, metavar="FILE",
                   help="fidelity: write every prompt's row (identical, tokens shared, tests passed) to this JSON file")
    p.add_argument("--float-activations", default=None, metavar="REGEX",
                   help="diagnostic: run the activations whose tensor names match REGEX in float on the host "
                        "(e.g. '.' for all, '^softmax' for the attention probabilities) to see what their "
                        "quantization costs; the graph inputs and outputs stay quantized")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Evaluate the bundle; prints the report (text or JSON)."""
    from qwen_ondevice.core.errors import UserError
    from qwen_ondevice.eval.evaluate import evaluate_bundle, evaluate_fidelity

    if args.tokens == 0 and not args.fidelity:
        raise UserError("--tokens 0 skips perplexity; add --fidelity to measure something")
    out = {}
    if args.tokens:
        acc = evaluate_bundle(args.bundle, args.reference, args.text, args.tokens, args.window, args.backend,
                              args.host_numerics, args.by_position, args.float_activations, args.skip_tokens)
        out["accuracy"] = acc.to_dict()
        if not args.json:
            print(acc.format(), flush=True)
    if args.fidelity:
        fid = evaluate_fidelity(args.bundle, args.reference, args.fidelity_prompts, args.max_new_tokens,
                                args.backend, args.host_numerics, args.float_activations)
        out["fidelity"] = fid.to_dict(rows=False)
        if args.details:
            args.details.write_text(json.dumps(fid.to_dict(), indent=1))
        if not args.json:
            print(fid.format())
    if args.json:
        print(json.dumps(out if args.fidelity else out["accuracy"], indent=1))
    return 0
