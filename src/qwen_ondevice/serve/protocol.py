"""The OpenAI-shaped HTTP protocol of ``serve``: request models, body parsing, errors and limits.

Request bodies are parsed by hand (strict UTF-8, JSON without NaN/Infinity) and validated with
pydantic; every error is an :class:`OpenAIError`, answered as
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from qwen_ondevice.core.errors import UserError
from qwen_ondevice.runtime.sampling import SamplingParams


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


def validation_error(errors: list[dict]) -> OpenAIError:
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
    speculative: bool | None = None  # extension: speculative decoding on/off for this request (server default: --draft)

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
        raise validation_error(e.errors(include_url=False)) from None
