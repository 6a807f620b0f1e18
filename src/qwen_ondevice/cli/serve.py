"""``qwen-ondevice serve MODEL``: the OpenAI-compatible HTTP server."""

from __future__ import annotations

import argparse

from qwen_ondevice.cli.args import add_model_args, add_speculative_args, drafter_factory, open_model
from qwen_ondevice.serve.protocol import ServerLimits


def register(subparsers) -> None:
    """Add ``serve`` to the CLI's subparsers."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, streaming)"
    )
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--max-queued", type=int, default=ServerLimits.max_queued,
                   help=f"requests that may wait for the engine; one more gets 503 with Retry-After (default {ServerLimits.max_queued})")
    p.add_argument("--max-body-bytes", type=int, default=ServerLimits.max_body_bytes,
                   help=f"largest request body accepted; a larger one gets 413 (default {ServerLimits.max_body_bytes})")
    add_speculative_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``qwen-ondevice serve``: open the runtime, bind, serve until interrupted."""
    import uvicorn

    from qwen_ondevice.core.progress import log
    from qwen_ondevice.serve.app import bind_socket, create_app

    sock = bind_socket(args.host, args.port)
    rt = open_model(args)
    new_drafter = drafter_factory(args, rt)
    app = create_app(rt, ServerLimits(max_body_bytes=args.max_body_bytes, max_queued=args.max_queued), new_drafter,
                     args.draft_tokens)
    host, port = sock.getsockname()[:2]
    log(f"serving {rt.model_name} ({rt.engine.backend.name}, context {rt.engine.context_length}) on http://{host}:{port}/v1")
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
    return 0
