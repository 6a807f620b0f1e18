"""Argument groups shared by several ``qwen-ondevice`` commands, and what the commands make of them
(nothing here imports a command)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qwen_ondevice.runtime.open_model import Runtime
    from qwen_ondevice.runtime.sampling import SamplingParams


def add_model_args(p: argparse.ArgumentParser) -> None:
    """MODEL and how to run it: backend, context length, prompt length, host numerics."""
    p.add_argument("model", metavar="MODEL", help="bundle folder, checkpoint folder, .gguf file, 'demo' or a Hub id")
    p.add_argument("--backend", choices=["torch", "ort-cpu", "qnn-htp"], help="default: ort-cpu for a bundle, torch for a checkpoint")
    p.add_argument("--context-length", type=int, default=4096, help="CL for a checkpoint on the torch backend (default 4096)")
    p.add_argument("--prompt-length", type=int, default=None,
                   help="AR of the prompt processor for a checkpoint (default 128, or CL/2 when CL is below 256)")
    add_host_numerics_arg(p)


def add_host_numerics_arg(p: argparse.ArgumentParser) -> None:
    """``--host-numerics`` (a bundle on ort-cpu)."""
    p.add_argument("--host-numerics", choices=["exact", "fast"], default="exact",
                   help="a bundle on ort-cpu: 'exact' runs the QDQ graphs' own arithmetic (the host simulation of the "
                        "device, default); 'fast' lets the int4/int8 weight products quantize their activations to "
                        "int8 blocks, as llama.cpp does (about 1.7x decode and 2x prefill on the demo model)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """How many tokens and how to sample them."""
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def add_speculative_args(p: argparse.ArgumentParser) -> None:
    """Speculative decoding: what drafts, and how many tokens per target call."""
    p.add_argument("--draft", default="none", metavar="none|lookup|MODEL",
                   help="speculative decoding, exactly lossless: 'lookup' drafts by prompt lookup (n-grams of the "
                        "prompt and the text so far), MODEL drafts with a smaller model of the same tokenizer "
                        "(a bundle or checkpoint); default none")
    p.add_argument("--draft-tokens", type=int, default=4, help="tokens drafted per target call at most (default 4)")


def drafter_factory(args: argparse.Namespace, rt: "Runtime"):
    """The ``--draft`` of :func:`add_speculative_args` for the target ``rt``: None, or a callable
    (sampling params) -> the drafter of one generation
    (``runtime.speculative.drafter_factory``).

    Raises:
        UserError: ``--draft-tokens`` below 1, or a draft MODEL that cannot be opened.
    """
    from qwen_ondevice.core.errors import UserError
    from qwen_ondevice.runtime.speculative import drafter_factory as factory

    if args.draft_tokens < 1:
        raise UserError(f"--draft-tokens must be at least 1, got {args.draft_tokens}")
    return factory(args.draft, rt.engine.config.vocab_size, rt.engine.context_length)


def sampling_params(args: argparse.Namespace) -> "SamplingParams":
    """The sampling arguments as validated :class:`~qwen_ondevice.runtime.sampling.SamplingParams`.

    Raises:
        UserError: a value out of range (e.g. ``--top-p 0``).
    """
    from qwen_ondevice.runtime.sampling import SamplingParams

    params = SamplingParams(args.temperature, args.top_k, args.top_p, args.repetition_penalty, args.seed)
    params.validate()
    return params


def open_model(args: argparse.Namespace) -> "Runtime":
    """The MODEL of :func:`add_model_args`, opened as a :class:`~qwen_ondevice.runtime.open_model.Runtime`."""
    from qwen_ondevice.runtime.open_model import open_runtime

    return open_runtime(args.model, args.backend, args.context_length, args.prompt_length, args.host_numerics)
