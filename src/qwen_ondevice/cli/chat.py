"""``qwen-ondevice chat MODEL``: multi-turn chat on the terminal or on piped stdin."""

from __future__ import annotations

import argparse
import sys

from qwen_ondevice.cli.args import (add_model_args, add_sampling_args, add_speculative_args, drafter_factory, open_model,
                                   sampling_params)
from qwen_ondevice.core.errors import UserError


def register(sub) -> None:
    """Add ``chat`` to the CLI's subparsers."""
    p = sub.add_parser("chat", help="interactive multi-turn chat (reads piped stdin too)")
    add_model_args(p)
    p.add_argument("--system", default=None)
    add_sampling_args(p)
    add_speculative_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Chat turn by turn on stdin (a terminal or a pipe); ``/reset`` clears the history, ``/exit``
    quits. A turn that fails (e.g. the conversation outgrew the context) is dropped from the history."""
    from qwen_ondevice.runtime.generate import stream_generate

    sampling = sampling_params(args)
    rt = open_model(args)
    new_drafter = drafter_factory(args, rt)
    drafter = new_drafter(sampling) if new_drafter else None
    interactive = sys.stdin.isatty()
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    if interactive:
        print("chat: /reset clears the history, /exit quits", file=sys.stderr)
    while True:
        if interactive:
            try:
                line = input(">>> ")
            except EOFError:
                break
        else:
            line = sys.stdin.readline()
            if not line:
                break
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            break
        if line == "/reset":
            history = history[:1] if args.system else []
            print("(history cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        prompt_ids = rt.tokenizer.apply_chat_template(history)
        try:
            reply = []
            for chunk in stream_generate(rt.engine, rt.tokenizer, prompt_ids, sampling, args.max_new_tokens, args.stop,
                                         drafter, args.draft_tokens):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                reply.append(chunk.text)
        except UserError as e:
            history.pop()
            print(f"error: {e}", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": "".join(reply)})
    return 0
