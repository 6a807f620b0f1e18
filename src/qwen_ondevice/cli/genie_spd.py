"""``qwen-ondevice genie-spd BUNDLE --draft DRAFT``: Genie's draft-model dialog for a compiled bundle."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    """Add ``genie-spd`` to the CLI's subparsers."""
    p = sub.add_parser("genie-spd", help="write genie_config_spd.json: Genie's own speculative decoding with a draft "
                                         "bundle (NOT lossless in Genie 1.21; the runtime's --draft is)")
    p.add_argument("bundle", type=Path, metavar="BUNDLE", help="the target: a compiled bundle with a verify graph")
    p.add_argument("--draft", type=Path, required=True, metavar="DRAFT",
                   help="the draft: a compiled bundle with the target's tokenizer and context length")
    p.add_argument("--draft-len", type=int, default=None, metavar="K",
                   help="tokens drafted per step (default: what the target's verify graph takes, its AR - 1)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the config; prints its path and how to run it."""
    from qwen_ondevice.qnn.genie import write_spd_config

    out = write_spd_config(args.bundle, args.draft, args.draft_len)
    print(f"wrote {out}; run it from the bundle folder: cd {args.bundle} && genie-t2t-run -c {out.name} -p '...'")
    print("note: Genie 1.21's spd is not lossless (its text departs from plain greedy decoding after a rejected "
          "draft token); qwen-ondevice generate/chat/serve --draft DRAFT is")
    return 0
