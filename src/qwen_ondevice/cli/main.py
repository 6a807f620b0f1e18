"""The ``qwen-ondevice`` command: the parser, with one module per subcommand in this package."""

from __future__ import annotations

import argparse
import os
import sys

from qwen_ondevice.cli import chat, evaluate, export, generate, genie_spd, inspect_bundle, serve, verify
from qwen_ondevice.core.errors import UserError
from qwen_ondevice.core.progress import set_quiet

#: Top-level modules of the ``export`` extra (pyproject.toml): a command that needs one of them
#: says how to install it.
EXPORT_EXTRA_MODULES = frozenset({"torch", "transformers", "safetensors", "gguf", "accelerate", "huggingface_hub"})


def build_parser() -> argparse.ArgumentParser:
    """The ``qwen-ondevice`` parser: each subcommand's module registers its own arguments."""
    parser = argparse.ArgumentParser(
        prog="qwen-ondevice",
        description="Qwen2 checkpoints to Snapdragon NPU bundles, and a host runtime for them.",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    for command in (generate, chat, export, inspect_bundle, evaluate, serve, verify, genie_spd):
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status: 0, 1 (a check failed), 2 (a :class:`UserError`,
    printed as one line, as is a missing module of the ``export`` extra), 130 (interrupted) or 141
    (stdout closed by its reader)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet_before = set_quiet(args.quiet)
    try:
        return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in EXPORT_EXTRA_MODULES:
            raise
        print(f"error: this needs {e.name}, part of the export extra (exporting a checkpoint, running one on torch); "
              "install it with: pip install 'qwen-ondevice[export]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (``generate ... | head``): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141  # 128 + SIGPIPE, as a shell reports it
    finally:
        set_quiet(quiet_before)  # a caller's later library calls print progress as before


if __name__ == "__main__":
    sys.exit(main())
