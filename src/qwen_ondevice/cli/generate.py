"""``qwen-ondevice generate MODEL --prompt ...``: answer one prompt."""

from __future__ import annotations

import argparse
import json
import sys

from qwen_ondevice.cli.args import (add_model_args, add_sampling_args, add_speculative_args, drafter_factory, open_model,
                                   sampling_params)


def register(sub) -> None:
    """Add ``generate`` to the CLI's subparsers."""
    p = sub.add_parser("generate", help="answer one prompt (chat template applied unless --raw)")
    add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--system", default=None, help="system message (default: the template's own)")
    p.add_argument("--raw", action="store_true", help="feed the prompt as plain text, no chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object with ids, text, finish reason and timings")
    add_sampling_args(p)
    add_speculative_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Answer ``args.prompt``: the text streams to stdout (or one JSON object with ``--json``), the
    speeds go to stderr."""
    from qwen_ondevice.runtime.generate import stream_generate

    sampling = sampling_params(args)
    rt = open_model(args)
    new_drafter = drafter_factory(args, rt)
    drafter = new_drafter(sampling) if new_drafter else None
    if args.raw:
        prompt_ids = rt.tokenizer.encode(args.prompt)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}
        ]
        prompt_ids = rt.tokenizer.apply_chat_template(messages)
    pieces, tokens, last = [], [], None
    for chunk in stream_generate(rt.engine, rt.tokenizer, prompt_ids, sampling, args.max_new_tokens, args.stop,
                                 drafter, args.draft_tokens):
        pieces.append(chunk.text)
        if chunk.token is not None:
            tokens.append(chunk.token)
        if not args.json:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
        last = chunk
    if args.json:
        print(
            json.dumps(
                {
                    "prompt_ids": list(prompt_ids),
                    "token_ids": tokens,
                    "text": "".join(pieces),
                    "finish_reason": last.finish_reason,
                    "backend": rt.engine.backend.name,
                    "timings": {
                        "prompt_tokens": last.prompt_tokens,
                        "generation_tokens": last.generation_tokens,
                        "time_to_first_token_s": round(last.time_to_first_token, 4),
                        "prompt_tokens_per_s": round(last.prompt_tps, 2),
                        "generation_tokens_per_s": round(last.generation_tps, 2),
                    },
                    "speculation": {"draft": args.draft, "target_calls": last.target_calls,
                                    "drafted_tokens": last.drafted_tokens, "accepted_tokens": last.accepted_tokens},
                }
            )
        )
    else:
        sys.stdout.write("\n")
        print(
            f"[{last.prompt_tokens} prompt tokens at {last.prompt_tps:.1f} tok/s, {last.generation_tokens} generated "
            f"at {last.generation_tps:.1f} tok/s, finish: {last.finish_reason}"
            + (f"; {last.accepted_tokens} of {last.drafted_tokens} drafted tokens accepted, "
               f"{last.target_calls} target calls" if drafter is not None else "") + "]",
            file=sys.stderr,
        )
    return 0
