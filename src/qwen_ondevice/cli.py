"""The ``qwen-ondevice`` command: a thin argparse layer over the package's stages."""

from __future__ import annotations

import argparse
import json
import sys

from .cli_args import add_model_args, add_sampling_args
from .errors import UserError


def _sampling(args):
    from .sampling import SamplingParams

    params = SamplingParams(args.temperature, args.top_k, args.top_p, args.repetition_penalty, args.seed)
    params.validate()
    return params


def _open(args):
    from .runtime import open_runtime

    return open_runtime(args.model, args.backend, args.context_length, args.prompt_length, args.host_numerics)


def cmd_generate(args) -> int:
    from .generate import stream_generate

    sampling = _sampling(args)
    rt = _open(args)
    if args.raw:
        prompt_ids = rt.tokenizer.encode(args.prompt)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}
        ]
        prompt_ids = rt.tokenizer.apply_chat_template(messages)
    pieces, tokens, last = [], [], None
    for chunk in stream_generate(rt.engine, rt.tokenizer, prompt_ids, sampling, args.max_new_tokens, args.stop):
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
                }
            )
        )
    else:
        sys.stdout.write("\n")
        print(
            f"[{last.prompt_tokens} prompt tokens at {last.prompt_tps:.1f} tok/s, {last.generation_tokens} generated "
            f"at {last.generation_tps:.1f} tok/s, finish: {last.finish_reason}]",
            file=sys.stderr,
        )
    return 0


def cmd_chat(args) -> int:
    from .generate import stream_generate

    sampling = _sampling(args)
    rt = _open(args)
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
            for chunk in stream_generate(rt.engine, rt.tokenizer, prompt_ids, sampling, args.max_new_tokens, args.stop):
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwen-ondevice",
        description="Qwen2 checkpoints to Snapdragon NPU bundles, and a host runtime for them.",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="answer one prompt (chat template applied unless --raw)")
    add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--system", default=None, help="system message (default: the template's own)")
    p.add_argument("--raw", action="store_true", help="feed the prompt as plain text, no chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object with ids, text, finish reason and timings")
    add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat (reads piped stdin too)")
    add_model_args(p)
    p.add_argument("--system", default=None)
    add_sampling_args(p)
    p.set_defaults(func=cmd_chat)

    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands():
    """Commands that live in their own modules (added as they are implemented)."""
    from . import evaluate, export, inspect_bundle, server, verify

    return [export.register_cli, inspect_bundle.register_cli, evaluate.register_cli, server.register_cli, verify.register_cli]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .progress import set_quiet

    set_quiet(args.quiet)
    try:
        return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (``generate ... | head``): stop quietly
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141  # 128 + SIGPIPE, as a shell reports it


if __name__ == "__main__":
    sys.exit(main())
