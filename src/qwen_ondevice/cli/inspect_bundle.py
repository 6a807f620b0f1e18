"""``qwen-ondevice inspect BUNDLE``: parts, graphs, sizes, op histograms and integrity of a bundle."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub) -> None:
    """Add ``inspect`` to the CLI's subparsers."""
    p = sub.add_parser("inspect", help="parts, graphs, sizes, op histograms and integrity of a bundle")
    p.add_argument("bundle", type=Path, metavar="BUNDLE")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the bundle's report; exit status 1 when a file is damaged."""
    from qwen_ondevice.eval.inspect_bundle import format_report, inspect_bundle

    r = inspect_bundle(args.bundle)
    print(json.dumps(r, indent=1) if args.json else format_report(r))
    return 1 if r["bad_files"] else 0
