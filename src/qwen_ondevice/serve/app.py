"""OpenAI-compatible HTTP server: ``qwen-ondevice serve MODEL``.

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (streaming as Server-Sent
Events or not), ``GET /v1/models``, ``GET /v1/models/{id}`` and ``GET /health``.

One engine serves every request: a single worker thread owns it (:mod:`qwen_ondevice.serve.worker`)
and runs the blocking :func:`~qwen_ondevice.runtime.generate.stream_generate` loop for one request
at a time, in arrival order; a client that disconnects frees the engine after at most one more
token step.

Request bodies are parsed and validated by :mod:`qwen_ondevice.serve.protocol`; every error is
answered in OpenAI's shape
``{"error": {"message", "type", "param", "code"}}`` with status 400 for a bad request, 404 for an
unknown path, 413 for a body over the size limit, 503 (with ``Retry-After``) when the queue of
waiting requests is full, and 500 for an internal error, and the server keeps serving afterwards.
Parsing, validation and tokenization run on a thread of their own, off the event loop, so
``/health`` and streams in progress are answered while a long prompt is being prepared.
:class:`~qwen_ondevice.serve.protocol.ServerLimits` holds the limits.

Sampling defaults follow OpenAI (``temperature`` 1, ``top_p`` 1); ``top_k`` and
``repetition_penalty`` are extensions (vLLM spells them the same). Without ``max_tokens`` (or
``max_completion_tokens``) a reply runs to a stop token or to the end of the context; reaching
the context end finishes with ``length``. The ``model`` field of a request is not checked: the
server has one model and names it in every response.
"""

import asyncio
import json
import logging
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from qwen_ondevice import __version__
from qwen_ondevice.core.errors import UserError
from qwen_ondevice.runtime.generate import GenerationChunk
from qwen_ondevice.runtime.open_model import Runtime
from qwen_ondevice.runtime.sampling import SamplingParams
from qwen_ondevice.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIError,
    ServerLimits,
    parse_body,
    validation_error,
)
from qwen_ondevice.serve.worker import ClientGone, GenerationWorker, Job, QueueFull


logger = logging.getLogger(__name__)


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


def _usage(prompt_tokens: int, completion_tokens: int, last: GenerationChunk | None = None, speculative: bool = False) -> dict:
    """OpenAI's usage object; with speculative decoding also (extensions) the tokens drafted and
    accepted and the target calls after the prefill."""
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}
    if speculative:
        usage.update(drafted_tokens=last.drafted_tokens if last else 0, accepted_tokens=last.accepted_tokens if last else 0,
                     target_calls=last.target_calls if last else 0)
    return usage


@dataclass
class _Prepared:
    """A validated request, tokenized and ready to queue."""

    kind: Literal["chat", "completion"]
    prompt_ids: list[int]
    sampling: SamplingParams
    max_tokens: int
    stop: list[str]
    stream: bool
    include_usage: bool
    speculative: bool = False


class _App:
    """Request handling around a :class:`GenerationWorker` (the routes call these methods)."""

    def __init__(self, runtime: Runtime, limits: ServerLimits, new_drafter=None, draft_tokens: int = 4):
        self.runtime = runtime
        self.limits = limits
        self.new_drafter = new_drafter
        self.worker = GenerationWorker(runtime, limits.max_queued, new_drafter, draft_tokens)
        # one thread prepares requests (parse, validate, tokenize) in arrival order, off the event loop
        self.preparer = ThreadPoolExecutor(1, thread_name_prefix="qwen-ondevice-prepare")
        self.created = int(time.time())
        self.fingerprint = f"qwen-ondevice-{__version__}-{runtime.engine.backend.name}"

    @property
    def context_length(self) -> int:
        return self.runtime.engine.context_length

    def _check_prompt(self, ids: list[int], param: str) -> None:
        cl = self.context_length
        if not ids:
            raise OpenAIError("the prompt is empty (0 tokens)", param=param)
        room = cl - 1  # the sequence holds at most CL tokens, and one of them must be generated
        if len(ids) > room:
            over = len(ids) - room
            raise OpenAIError(
                f"This model's maximum context length is {cl} tokens, so a prompt may use at most {room} "
                f"(one position is left for the reply). Your prompt is {len(ids)} tokens, {over} too many; "
                "shorten it (or serve with a larger --context-length).",
                param=param,
                code="context_length_exceeded",
            )

    def _check_stops(self, stops: list[str]) -> list[str]:
        lim = self.limits
        if len(stops) > lim.max_stops:
            raise OpenAIError(f"at most {lim.max_stops} stop strings are allowed, got {len(stops)}", param="stop")
        for s in stops:
            if not s:
                raise OpenAIError("a stop string must not be empty", param="stop")
            if len(s) > lim.max_stop_chars:
                raise OpenAIError(f"a stop string may have at most {lim.max_stop_chars} characters, got {len(s)}", param="stop")
        return stops

    async def read_body(self, request) -> bytes:
        """The request body, refused with 413 past ``limits.max_body_bytes`` without reading it all."""
        limit = self.limits.max_body_bytes
        too_large = OpenAIError(f"the request body is larger than this server's limit of {limit} bytes",
                                status=413, code="request_too_large")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > limit:
                raise too_large
        return bytes(body)

    def submit(self, p: _Prepared) -> Job:
        """Queue a prepared request; 503 with ``Retry-After`` when the queue is full."""
        try:
            return self.worker.submit(p.prompt_ids, p.sampling, p.max_tokens, p.stop, p.speculative)
        except QueueFull as e:
            wait = self.worker.retry_after()
            raise OpenAIError(f"the server is busy: {e.args[0]} requests are already waiting for the engine; "
                              f"retry in about {wait} s", status=503, type="server_error", code="server_overloaded",
                              headers={"Retry-After": str(wait)}) from None

    def prepare_chat(self, req: ChatCompletionRequest) -> _Prepared:
        """Validate and tokenize a chat request (the tokenizer's own chat template); 400 on error."""
        req.check_supported()
        sampling = req.sampling()
        messages = [m.to_template() for m in req.messages]
        try:
            ids = self.runtime.tokenizer.apply_chat_template(messages)
        except UserError as e:
            raise OpenAIError(str(e), param="messages") from None
        except Exception as e:  # the template's own checks (jinja2 raise_exception) and render errors
            raise OpenAIError(f"the chat template cannot render these messages: {e}", param="messages") from None
        self._check_prompt(ids, "messages")
        return _Prepared("chat", ids, sampling, req.limit() or self.context_length, self._check_stops(req.stops()),
                         bool(req.stream), req.include_usage, self._speculative(req))

    def prepare_completion(self, req: CompletionRequest) -> _Prepared:
        """Validate and tokenize a completion request (raw text or token ids, no template); 400 on error."""
        req.check_supported()
        sampling = req.sampling()
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise OpenAIError(f"only one prompt per request is supported, got {len(prompt)}", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = self.runtime.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            vocab = self.runtime.engine.config.vocab_size
            bad = [i for i in ids if not 0 <= i < vocab]
            if bad:
                raise OpenAIError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})", param="prompt")
        self._check_prompt(ids, "prompt")
        return _Prepared("completion", ids, sampling, req.limit() or self.context_length, self._check_stops(req.stops()),
                         bool(req.stream), req.include_usage, self._speculative(req))

    def _speculative(self, req) -> bool:
        """Whether a request decodes speculatively: its ``speculative`` field, else whether the
        server was started with a drafter; 400 when asked of a server without one."""
        if req.speculative and self.new_drafter is None:
            raise OpenAIError("speculative decoding is off on this server; start it with --draft lookup (or a draft MODEL)",
                              param="speculative", code="unsupported_value")
        return self.new_drafter is not None if req.speculative is None else req.speculative

    async def _next(self, job: Job, request) -> GenerationChunk | None:
        """Next chunk of ``job`` (``None`` at its end).

        Checks at least every 0.25 s, whether chunks are flowing or not, that the client is still
        connected; if it is not, cancels the job (freeing the engine after the current token
        step) and raises ClientGone.
        """
        while True:
            now = time.monotonic()
            if now - job.checked >= 0.25:
                job.checked = now
                if await request.is_disconnected():
                    job.cancel()
                    raise ClientGone()
            try:
                return await asyncio.wait_for(job.next(), timeout=0.25)
            except asyncio.TimeoutError:
                continue

    async def complete(self, p: _Prepared, job: Job, request) -> dict:
        """Run a queued request to the end; the non-streaming response body.

        Raises:
            OpenAIError: generation refused the request (400).
            ClientGone: the client disconnected (the job is cancelled).
        """
        pieces, n, last = [], 0, None
        try:
            while (chunk := await self._next(job, request)) is not None:
                pieces.append(chunk.text)
                n += chunk.token is not None
                last = chunk
        except UserError as e:
            raise OpenAIError(str(e)) from None
        finally:
            job.cancel()  # no-op when finished
        text = "".join(pieces)
        base = {"created": int(time.time()), "model": self.runtime.model_name, "system_fingerprint": self.fingerprint}
        if p.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None}, "logprobs": None,
                      "finish_reason": last.finish_reason}
            return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", **base, "choices": [choice],
                    "usage": _usage(len(p.prompt_ids), n, last, p.speculative)}
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": last.finish_reason}
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", **base, "choices": [choice],
                "usage": _usage(len(p.prompt_ids), n, last, p.speculative)}

    async def stream(self, p: _Prepared, job: Job, request):
        """Async iterator of SSE bytes of a queued request: chunks, the final chunk, the usage chunk, ``[DONE]``."""
        chat = p.kind == "chat"
        base = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.runtime.model_name,
            "system_fingerprint": self.fingerprint,
        }

        def event(text: str | None, finish: str | None, role: bool = False) -> bytes:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"text": text or "", "index": 0, "logprobs": None, "finish_reason": finish}
            obj = {**base, "choices": [choice]}
            if p.include_usage:
                obj["usage"] = None
            return _sse(obj)

        try:
            if chat:
                yield event(None, None, role=True)
            n, last = 0, None
            while (chunk := await self._next(job, request)) is not None:
                n += chunk.token is not None
                last = chunk
                if chunk.text:
                    yield event(chunk.text, None)
                if chunk.finish_reason is not None:
                    yield event(None, chunk.finish_reason)
            if p.include_usage:
                yield _sse({**base, "choices": [], "usage": _usage(len(p.prompt_ids), n, last, p.speculative)})
            yield b"data: [DONE]\n\n"
        except ClientGone:
            return
        except Exception as e:  # headers are sent: report in the stream, as OpenAI does
            if isinstance(e, UserError):
                err = OpenAIError(str(e))
            else:  # the worker has logged the traceback
                err = OpenAIError(f"internal error: {type(e).__name__}: {e}", status=500, type="server_error")
            yield _sse(err.body())
        finally:
            job.cancel()  # no-op when finished; frees the engine when the stream is abandoned


def create_app(runtime: Runtime, limits: ServerLimits | None = None, new_drafter=None, draft_tokens: int = 4) -> "FastAPI":
    """The FastAPI application serving ``runtime`` (one engine, requests run one at a time) within
    ``limits`` (default :class:`ServerLimits`). ``new_drafter``: a callable giving the drafter of
    one request (speculative decoding on by default, ``"speculative": false`` turns it off per
    request), with up to ``draft_tokens`` per target call; None: off.

    The engine's worker thread starts with the app's lifespan (or at the first request) and stops
    at shutdown. ``app.state.server.worker`` is the :class:`GenerationWorker`.
    """
    srv = _App(runtime, limits or ServerLimits(), new_drafter, draft_tokens)

    @asynccontextmanager
    async def lifespan(app):
        srv.worker.start()
        try:
            yield
        finally:
            srv.worker.stop()
            srv.preparer.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="qwen-ondevice", version=__version__, lifespan=lifespan)
    app.state.server = srv
    _add_error_handlers(app)
    _add_routes(app, srv, runtime)
    return app


def _error_response(e: OpenAIError):

    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _add_error_handlers(app) -> None:
    """Every error as OpenAI's error object: ours, request validation, unknown routes, the rest (500)."""

    @app.exception_handler(OpenAIError)
    async def _openai_error(request, exc: OpenAIError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request, exc: RequestValidationError):
        return _error_response(validation_error(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        msg = f"{request.method} {request.url.path}: {exc.detail}"
        return _error_response(OpenAIError(msg, status=exc.status_code, code=code))

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        logger.exception("internal error")
        return _error_response(OpenAIError(f"internal error: {type(exc).__name__}: {exc}", status=500, type="server_error"))


def _add_routes(app, srv: "_App", runtime: Runtime) -> None:
    """The OpenAI routes (chat completions, completions, models) and /health."""

    async def handle(request: Request, model: type[BaseModel], kind: str):
        raw = await srv.read_body(request)
        prepare = srv.prepare_chat if kind == "chat" else srv.prepare_completion
        p = await asyncio.get_running_loop().run_in_executor(srv.preparer, lambda: prepare(parse_body(raw, model)))
        job = srv.submit(p)  # before any response byte: a full queue is a 503, not a broken stream
        if p.stream:
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(srv.stream(p, job, request), media_type="text/event-stream", headers=headers)
        try:
            return JSONResponse(await srv.complete(p, job, request))
        except ClientGone:
            return Response(status_code=499)  # nobody reads this; the engine is already free

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, ChatCompletionRequest, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, CompletionRequest, "completion")

    def model_card() -> dict:
        return {"id": runtime.model_name, "object": "model", "created": srv.created, "owned_by": "qwen-ondevice"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != runtime.model_name:
            raise OpenAIError(f"The model '{model_id}' does not exist; this server has '{runtime.model_name}'",
                              status=404, param="model", code="model_not_found")
        return model_card()

    @app.get("/health")
    async def health():
        w = srv.worker
        return {"status": "ok", "model": runtime.model_name, "backend": runtime.engine.backend.name,
                "context_length": srv.context_length, "busy": w.busy, "queued": w.queued}


# ----------------------------------------------------------------------------------------------
# CLI


def bind_socket(host: str, port: int):
    """A listening-ready TCP socket on host:port (port 0 picks a free one).

    Raises:
        UserError: the address cannot be bound (in use, not local, ...).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock

