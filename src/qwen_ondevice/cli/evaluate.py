"""``qwen-ondevice evaluate BUNDLE``: perplexity, top-1 agreement and KL against the float model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qwen_ondevice.cli.args import add_host_numerics_arg
from qwen_ondevice.eval.evaluate import DEFAULT_EVAL_TOKENS, DEFAULT_WINDOW


def register(sub) -> None:
    """Add ``evaluate`` to the CLI's subparsers."""
    p = sub.add_parser("evaluate", help="perplexity, top-1 agreement and KL of a bundle against the float model")
    p.add_argument("bundle", type=Path, metavar="BUNDLE")
    p.add_argument("--reference", default=None, help="float MODEL to compare with (default: the model the bundle was exported from)")
    p.add_argument("--text", default=None, help="held-out text file (default: WikiText-2 test, shipped)")
    p.add_argument("--tokens", type=int, default=DEFAULT_EVAL_TOKENS)
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW)
    p.add_argument("--backend", choices=["ort-cpu", "qnn-htp"], default="ort-cpu")
    add_host_numerics_arg(p)
    p.add_argument("--by-position", type=int, default=None, metavar="N",
                   help="also report the metrics per N positions of the window (e.g. 1024 with --window 4096: "
                        "whether the accuracy holds deep into the context)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Evaluate the bundle; prints the report (text or JSON)."""
    from qwen_ondevice.eval.evaluate import evaluate_bundle

    r = evaluate_bundle(args.bundle, args.reference, args.text, args.tokens, args.window, args.backend, args.host_numerics,
                        args.by_position)
    print(json.dumps(r.to_dict(), indent=1) if args.json else r.format())
    return 0
