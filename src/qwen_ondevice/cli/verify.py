"""``qwen-ondevice verify BUNDLE``: the QNN context binaries against the QDQ parts, and Genie itself."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qwen_ondevice.eval.verify import DEFAULT_PROMPT


def register(sub) -> None:
    """Add ``verify`` to the CLI's subparsers."""
    p = sub.add_parser("verify", help="run each part's QNN context binary on the HTP (simulator on x86_64) "
                                      "against the ORT CPU run of the same QDQ part")
    p.add_argument("bundle", type=Path, metavar="BUNDLE")
    p.add_argument("--chipset", default=None, help="the chipset whose binaries to check (default: the bundle's)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the short chat prompt whose inputs are replayed")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--genie", action="store_true",
                   help="also run Genie itself (libGenie.so of onnxruntime-qnn, child process) on the bundle's non-shared "
                        "twin and compare its greedy tokens and text with the qnn-htp runtime's (eval/genie_verify.py)")
    p.add_argument("--genie-only", action="store_true", help="run only the Genie check (skip the per-part comparison)")
    p.add_argument("--genie-tokens", type=int, default=8, help="greedy tokens per Genie query (default 8)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Verify the bundle (and/or run Genie on it); exit status 1 when a check fails."""
    from qwen_ondevice.eval.verify import format_report, verify_bundle

    ok, out = True, {}
    if not args.genie_only:
        r = verify_bundle(args.bundle, args.chipset, args.prompt)
        out["verify"], ok = r, r["ok"]
        if not args.json:
            print(format_report(r))
    if args.genie or args.genie_only:
        from qwen_ondevice.eval.genie_verify import format_genie_report, verify_genie

        g = verify_genie(args.bundle, args.prompt, args.genie_tokens)
        out["genie"], ok = g, ok and g["ok"]
        if not args.json:
            print(format_genie_report(g))
    if args.json:
        print(json.dumps(out if len(out) > 1 else next(iter(out.values())), indent=1))
    return 0 if ok else 1
