"""OpenAI-compatible HTTP server: ``qwen-ondevice serve MODEL``.

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (streaming as Server-Sent
Events or not), ``GET /v1/models``, ``GET /v1/models/{id}`` and ``GET /health``.

One engine serves every request. A single worker thread owns it and runs the blocking
:func:`~qwen_ondevice.generate.stream_generate` loop for one request at a time, in arrival order,
so no request ever sees another one's KV cache. The worker checks between tokens whether the
client is still there: a client that disconnects (or a request that is cancelled) frees the engine
after at most one more token step, and a queued request whose client left is skipped.

Request bodies are parsed by hand (strict UTF-8, JSON without NaN/Infinity) and validated with
pydantic; every error is answered in OpenAI's shape
``{"error": {"message", "type", "param", "code"}}`` with status 400 for a bad request, 404 for an
unknown path, 413 for a body over the size limit, 503 (with ``Retry-After``) when the queue of
waiting requests is full, and 500 for an internal error, and the server keeps serving afterwards.
Parsing, validation and tokenization run on a thread of their own, off the event loop, so
``/health`` and streams in progress are answered while a long prompt is being prepared.
:class:`ServerLimits` holds the limits.

Sampling defaults follow OpenAI (``temperature`` 1, ``top_p`` 1); ``top_k`` and
``repetition_penalty`` are extensions (vLLM spells them the same). Without ``max_tokens`` (or
``max_completion_tokens``) a reply runs to a stop token or to the end of the context; reaching
the context end finishes with ``length``. The ``model`` field of a request is not checked: the
server has one model and names it in every response.
"""


import argparse
import asyncio
import json
import logging
import math
import queue
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from . import __version__
from .errors import UserError
from .generate import GenerationChunk, stream_generate
from .runtime import Runtime
from .sampling import SamplingParams

if TYPE_CHECKING:
    from fastapi import FastAPI

logger = logging.getLogger("qwen_ondevice.server")


@dataclass
class ServerLimits:
    """What one server accepts, so that a client cannot exhaust it.

    max_body_bytes: a request body larger than this is refused with 413 before it is parsed
    (Content-Length checked first, the bytes counted as they arrive for a chunked body).
    max_queued: requests waiting for the engine (the running one not counted); one more is
    refused with 503 and a ``Retry-After`` (seconds) estimated from the recent requests' times.
    max_stops / max_stop_chars: the number of ``stop`` strings (OpenAI's own limit is 4) and the
    length of each in characters; the stop filter holds back up to the longest stop's length of
    text, so a long one would delay every streamed piece.
    """

    max_body_bytes: int = 4 << 20
    max_queued: int = 16
    max_stops: int = 4
    max_stop_chars: int = 256

    def __post_init__(self):
        for name in ("max_body_bytes", "max_stops", "max_stop_chars"):
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', ' ')} must be >= 1, got {getattr(self, name)}")
        if self.max_queued < 0:
            raise UserError(f"max queued must be >= 0, got {self.max_queued}")


# ----------------------------------------------------------------------------------------------
# Errors


class OpenAIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        """The JSON error body."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_UNION_TAGS = {"str", "int", "float", "bool", "none", "dict"}


def _loc_to_param(loc) -> str | None:
    """pydantic/FastAPI error location -> OpenAI ``param`` ('messages[0].role')."""
    parts = [p for p in loc if p != "body"]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif not isinstance(p, str) or "[" in p or p in _UNION_TAGS:
            continue  # union-member tags pydantic adds to a location ('str', 'list[int]', ...)
        else:
            out += ("." if out else "") + p
    return out or None


def _validation_error(errors: list[dict]) -> OpenAIError:
    """The first pydantic/FastAPI validation error as a 400 OpenAIError."""
    err = errors[0]
    if err.get("type") == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "")
        return OpenAIError(f"We could not parse the JSON body of your request: {detail}".rstrip(": "), code="invalid_json")
    param = _loc_to_param(err.get("loc", ()))
    if err.get("type") == "missing":
        return OpenAIError(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    if param:
        msg = f"Invalid value for '{param}': {msg}"
    return OpenAIError(msg, param=param, code="invalid_value")


# ----------------------------------------------------------------------------------------------
# Request models


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ChatMessage(_Strict):
    """One message; ``developer`` is treated as ``system``; content may be text parts."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None
    tool_call_id: str | None = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, v):
        if v is None or isinstance(v, str):
            return v
        if isinstance(v, list):
            for part in v:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"only text content parts are supported ({{'type': 'text', 'text': ...}}), got {str(part)[:60]}")
            return "\n".join(part["text"] for part in v)
        raise ValueError(f"content must be a string or a list of text parts, got {type(v).__name__}")

    def to_template(self) -> dict:
        content = self.content
        msg = {"role": "system" if self.role == "developer" else self.role, "content": content or ""}
        if self.tool_call_id is not None:
            msg["tool_call_id"] = self.tool_call_id
        return msg


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingFields(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict | None = None
    logprobs: Any = None

    def check_supported(self) -> None:
        """Reject what this server would otherwise silently ignore (400)."""
        if self.n is not None and self.n != 1:
            raise OpenAIError(f"only n=1 is supported (one choice per request), got n={self.n}", param="n", code="unsupported_value")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise OpenAIError(f"{name} is not supported; use repetition_penalty", param=name, code="unsupported_parameter")
        if self.logit_bias:
            raise OpenAIError("logit_bias is not supported", param="logit_bias", code="unsupported_parameter")
        if self.logprobs:
            raise OpenAIError("logprobs are not supported", param="logprobs", code="unsupported_parameter")

    def sampling(self) -> SamplingParams:
        """The request's sampling parameters, OpenAI defaults filled in; 400 when out of range."""
        seed = None if self.seed is None else self.seed % 2**64  # negative seeds as two's complement
        params = SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_k=self.top_k or 0,
            top_p=1.0 if self.top_p is None else self.top_p,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            seed=seed,
        )
        try:
            params.validate()
        except UserError as e:
            raise OpenAIError(str(e)) from None
        return params

    def stops(self) -> list[str]:
        """``stop`` as a list of strings."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    top_logprobs: int | None = None
    tools: list | None = None
    response_format: dict | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs:
            raise OpenAIError("logprobs are not supported", param="top_logprobs", code="unsupported_parameter")
        if self.tools:
            raise OpenAIError("tools (function calling) are not supported", param="tools", code="unsupported_parameter")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise OpenAIError("only response_format {'type': 'text'} is supported", param="response_format",
                              code="unsupported_value")

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise OpenAIError("echo is not supported", param="echo", code="unsupported_parameter")
        if self.best_of is not None and self.best_of != 1:
            raise OpenAIError(f"only best_of=1 is supported, got {self.best_of}", param="best_of", code="unsupported_value")
        if self.suffix:
            raise OpenAIError("suffix is not supported", param="suffix", code="unsupported_parameter")

    def limit(self) -> int | None:
        return self.max_tokens


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_body(raw: bytes, model: type[BaseModel]) -> BaseModel:
    """Request bytes -> a validated request model.

    Raises:
        OpenAIError: (400) empty body, not UTF-8, not JSON, not an object, or invalid fields.
    """
    if not raw.strip():
        raise OpenAIError("the request body is empty; send a JSON object", code="invalid_json")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise OpenAIError(
            f"the request body is not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})", code="invalid_encoding"
        ) from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except ValueError as e:
        raise OpenAIError(f"We could not parse the JSON body of your request: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise OpenAIError("the request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e.errors(include_url=False)) from None


# ----------------------------------------------------------------------------------------------
# The worker: one thread, one engine, one request at a time

_END = object()


class QueueFull(Exception):
    """The worker's queue holds its maximum of waiting jobs."""


class ClientGone(Exception):
    """The client disconnected before its reply was complete."""


@dataclass
class Job:
    """One queued generation and the asyncio queue its chunks arrive on.

    The worker puts :class:`GenerationChunk` records, then an exception (if generation failed),
    then an end marker. :meth:`cancel` asks the worker to stop after the current token step.
    """

    prompt_ids: list[int]
    sampling: SamplingParams
    max_tokens: int
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    chunks: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: int = 0  # tokens the worker produced for this job
    reused: int = 0  # prompt tokens whose KV was kept from the previous request
    checked: float = 0.0  # time.monotonic() of the last check that the client is connected

    done: bool = False  # the worker has finished with this job (a later cancel() is a no-op)

    def cancel(self) -> None:
        """Ask the worker to stop this job after the current token step (or to skip it)."""
        if not self.done:
            self.cancelled.set()

    def _deliver(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.chunks.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            self.cancelled.set()

    async def next(self) -> GenerationChunk | None:
        """The next chunk, ``None`` at the end; re-raises the worker's exception."""
        item = await self.chunks.get()
        if item is _END:
            return None
        if isinstance(item, BaseException):
            raise item
        return item


class GenerationWorker:
    """The thread that owns ``runtime.engine`` and runs queued jobs in arrival order.

    Attributes (read by ``/health`` and the tests): ``busy`` (a job is running), ``completed``
    and ``cancelled`` (job counts), ``last_job`` (the most recent job it finished or abandoned).
    """

    def __init__(self, runtime: Runtime, max_queued: int | None = None):
        self.runtime = runtime
        self.max_queued = max_queued
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.busy = False
        self.completed = 0
        self.cancelled = 0
        self.last_job: Job | None = None
        self.mean_job_seconds: float | None = None  # moving average over the finished jobs

    @property
    def queued(self) -> int:
        """Jobs waiting for the engine (not counting the running one)."""
        return self._jobs.qsize()

    def start(self) -> None:
        """Start the thread (idempotent)."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="qwen-ondevice-engine", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel queued and running jobs, end the thread and wait for it (seconds)."""
        pending = []
        while True:
            try:
                pending.append(self._jobs.get_nowait())
            except queue.Empty:
                break
        for job in pending:
            if job is not None:
                job.cancel()
                job._deliver(_END)
        if self.last_job is not None:
            self.last_job.cancel()
        self._jobs.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def retry_after(self) -> int:
        """Seconds until a place in the queue is likely free: the mean job time so far (at least 1)."""
        return max(1, math.ceil(self.mean_job_seconds or 1.0))

    def submit(self, prompt_ids: list[int], sampling: SamplingParams, max_tokens: int, stop: list[str]) -> Job:
        """Queue a generation; must be called from the event loop that will read the job.

        Raises:
            QueueFull: ``max_queued`` jobs are already waiting.
        """
        if self.max_queued is not None and self.queued >= self.max_queued:
            raise QueueFull(self.queued)
        self.start()
        job = Job(list(prompt_ids), sampling, max_tokens, stop, asyncio.get_running_loop())
        self._jobs.put(job)
        return job

    def _run(self) -> None:
        rt = self.runtime
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if job.cancelled.is_set():
                self.cancelled += 1
                job.done = True
                job._deliver(_END)
                continue
            self.busy = True
            self.last_job = job
            started = time.monotonic()
            gen = stream_generate(rt.engine, rt.tokenizer, job.prompt_ids, job.sampling, job.max_tokens, job.stop)
            try:
                for chunk in gen:
                    job.reused = rt.engine.reused
                    if chunk.token is not None:
                        job.generated += 1
                    job._deliver(chunk)
                    if job.cancelled.is_set():
                        break
                gen.close()
            except Exception as e:  # report to the request; the engine's state stays consistent
                if not isinstance(e, UserError):
                    logger.exception("generation failed")
                rt.engine.reset()
                job._deliver(e)
            finally:
                job.done = True
                if job.cancelled.is_set():
                    self.cancelled += 1
                else:
                    self.completed += 1
                    took = time.monotonic() - started
                    self.mean_job_seconds = took if self.mean_job_seconds is None else 0.8 * self.mean_job_seconds + 0.2 * took
                self.busy = False
                job._deliver(_END)


# ----------------------------------------------------------------------------------------------
# Responses


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


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


class _App:
    """Request handling around a :class:`GenerationWorker` (the routes call these methods)."""

    def __init__(self, runtime: Runtime, limits: ServerLimits):
        self.runtime = runtime
        self.limits = limits
        self.worker = GenerationWorker(runtime, limits.max_queued)
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
            return self.worker.submit(p.prompt_ids, p.sampling, p.max_tokens, p.stop)
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
                         bool(req.stream), req.include_usage)

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
                         bool(req.stream), req.include_usage)

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
                    "usage": _usage(len(p.prompt_ids), n)}
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": last.finish_reason}
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", **base, "choices": [choice],
                "usage": _usage(len(p.prompt_ids), n)}

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
            n = 0
            while (chunk := await self._next(job, request)) is not None:
                n += chunk.token is not None
                if chunk.text:
                    yield event(chunk.text, None)
                if chunk.finish_reason is not None:
                    yield event(None, chunk.finish_reason)
            if p.include_usage:
                yield _sse({**base, "choices": [], "usage": _usage(len(p.prompt_ids), n)})
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


def create_app(runtime: Runtime, limits: ServerLimits | None = None) -> "FastAPI":
    """The FastAPI application serving ``runtime`` (one engine, requests run one at a time) within
    ``limits`` (default :class:`ServerLimits`).

    The engine's worker thread starts with the app's lifespan (or at the first request) and stops
    at shutdown. ``app.state.server.worker`` is the :class:`GenerationWorker`.
    """
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    srv = _App(runtime, limits or ServerLimits())

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

    def error_response(e: OpenAIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(OpenAIError)
    async def _openai_error(request, exc: OpenAIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request, exc: RequestValidationError):
        return error_response(_validation_error(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        msg = f"{request.method} {request.url.path}: {exc.detail}"
        return error_response(OpenAIError(msg, status=exc.status_code, code=code))

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        logger.exception("internal error")
        return error_response(OpenAIError(f"internal error: {type(exc).__name__}: {exc}", status=500, type="server_error"))

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

    return app


# ----------------------------------------------------------------------------------------------
# CLI


def bind_socket(host: str, port: int):
    """A listening-ready TCP socket on host:port (port 0 picks a free one).

    Raises:
        UserError: the address cannot be bound (in use, not local, ...).
    """
    import socket

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


def cmd_serve(args) -> int:
    """``qwen-ondevice serve``: open the runtime, bind, serve until interrupted."""
    import uvicorn

    from .progress import log
    from .runtime import open_runtime

    sock = bind_socket(args.host, args.port)
    rt = open_runtime(args.model, args.backend, args.context_length, args.prompt_length, args.host_numerics)
    app = create_app(rt, ServerLimits(max_body_bytes=args.max_body_bytes, max_queued=args.max_queued))
    host, port = sock.getsockname()[:2]
    log(f"serving {rt.model_name} ({rt.engine.backend.name}, context {rt.engine.context_length}) on http://{host}:{port}/v1")
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def register_cli(subparsers) -> None:
    """Add the ``serve`` subcommand to the ``qwen-ondevice`` parser's subparsers."""
    from .cli_args import add_model_args

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
    p.set_defaults(func=cmd_serve)
