"""Request bodies of the OpenAI API as far as fuselm implements them.

Every model forbids extra fields and is strict about types, so a field we do not implement, or a value of the
wrong type, gets one 400 naming it instead of being ignored. Fields marked "fuselm" are extensions (llama.cpp's
server has the same ones); the openai client sends them with `extra_body`.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ApiError

MAX_TOKENS = 1 << 20
MAX_N = 8
SEED_RANGE = dict(ge=-(1 << 63), le=(1 << 63) - 1)  # what torch.Generator.manual_seed takes without surprise


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(Strict):
    include_usage: bool = False


Stop = Annotated[str, Field(min_length=1, max_length=256)]


class Sampling(Strict):
    """Fields shared by completions and chat completions."""
    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=100_000)  # fuselm
    min_p: float | None = Field(None, ge=0, lt=1)  # fuselm
    repetition_penalty: float | None = Field(None, gt=0, le=100)  # fuselm
    presence_penalty: float | None = None  # only 0 (not implemented otherwise)
    frequency_penalty: float | None = None  # only 0
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop | Annotated[list[Stop], Field(max_length=4)] | None = None
    seed: int | None = Field(None, **SEED_RANGE)

    @model_validator(mode="after")
    def _checks(self):
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if value not in (None, 0):
                raise ApiError(400, f"{name}: only 0 is supported (fuselm implements repetition_penalty instead)",
                               param=name)
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options: only allowed when stream is true", param="stream_options")
        return self

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(Sampling):
    prompt: Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]],
                                                           Field(min_length=1, max_length=MAX_N)] \
        | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _echo(self):
        if self.echo and self.logprobs is not None:
            raise ApiError(400, "echo: echo with logprobs (prompt logprobs) is not supported", param="echo")
        return self


class ImageUrl(Strict):
    url: str
    detail: Literal["auto"] | None = None


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ImagePart(Strict):
    type: Literal["image_url"]
    image_url: ImageUrl


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | Annotated[list[Part], Field(min_length=1)]


class ResponseFormat(Strict):
    type: Literal["text"]


class ChatRequest(Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    modalities: Annotated[list[Literal["text", "image"]], Field(min_length=1, max_length=2)] | None = None
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _limits(self):
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ApiError(400, "max_tokens and max_completion_tokens disagree; send one of them",
                           param="max_completion_tokens")
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs: needs logprobs: true", param="top_logprobs")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def images_mode(self) -> str:
        """fuselm's images option: text only, text that may hold pictures, or one picture."""
        kinds = set(self.modalities or ["text"])
        return {frozenset({"text"}): "off", frozenset({"image"}): "only"}.get(frozenset(kinds), "on")


class ImageRequest(Strict):
    prompt: Annotated[str, Field(min_length=1, max_length=32_000)]
    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    size: str | None = None
    response_format: Literal["b64_json"] = "b64_json"
    seed: int | None = Field(None, **SEED_RANGE)  # fuselm


class TokenizeRequest(Strict):
    content: str
    add_special: bool = False
    model: str | None = None


class DetokenizeRequest(Strict):
    tokens: list[Annotated[int, Field(ge=0)]]
    model: str | None = None


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_body(raw: bytes, schema: type[BaseModel]) -> BaseModel:
    """A request body as `schema`; every problem is one ApiError(400) naming the field."""
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and bad UTF-8 are ValueErrors
        raise ApiError(400, f"the body is not valid JSON ({str(err)[:200]})") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(data).__name__}")
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise _field_error(err, data) from None


def _field_error(err: ValidationError, data: dict) -> ApiError:
    first = err.errors(include_url=False)[0]
    path = _input_path(first["loc"], data)
    if first["type"] == "extra_forbidden":
        return ApiError(400, f"unsupported field {path!r}: fuselm does not implement it", param=path)
    if first["type"] == "missing":
        return ApiError(400, f"missing field {path!r}", param=path)
    got = first.get("input")
    shown = json.dumps(got)[:80] if isinstance(got, (int, float, str, bool, type(None))) else type(got).__name__
    if isinstance(got, float) and not math.isfinite(got):
        shown = str(got)
    return ApiError(400, f"field {path!r}: {first['msg']} (got {shown})", param=path)


def _input_path(loc: tuple, data) -> str:
    """The location as a path through the input (pydantic adds union-member labels; those are dropped)."""
    parts, cur = [], data
    for part in loc:
        if isinstance(cur, dict) and part in cur:
            parts.append(str(part))
            cur = cur[part]
        elif isinstance(cur, list) and isinstance(part, int) and part < len(cur):
            parts.append(f"[{part}]")
            cur = cur[part]
        elif isinstance(part, str) and (not parts or part is loc[-1] and isinstance(cur, dict)):
            parts.append(part)  # a missing or extra field
    return ".".join(parts).replace(".[", "[") or "body"
