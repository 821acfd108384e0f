"""The HTTP routes: OpenAI-style completions, chat (pictures both ways), images, tokenize, health, metrics, and the
web page. Starlette on uvicorn; the engine does the decoding (see engine.py)."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..errors import FuselmError
from ..generation.render import chat_parts
from .engine import Engine, EngineBusy, EngineRequest, EngineShutdown
from .errors import ApiError, error_body
from .images import image_from_data_url, parse_size, png_base64
from .metrics import Metrics
from .middleware import ApiKey, BodyLimit, CountRequests
from .openai_schema import (
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    ImageRequest,
    Message,
    Sampling,
    TokenizeRequest,
    parse_body,
)
from .responses import Answer, ChatChunks, CompletionChunks, TokenText, finish_reason, sse, usage

WEB = Path(__file__).with_name("web")
MAX_BODY = 16 << 20
SEED_SPAN = 1 << 63


class Api:
    """Route handlers over one model and engine."""

    def __init__(self, model, engine: Engine, metrics: Metrics, *, alias: str, default_max_tokens: int = 256):
        self.model, self.engine, self.metrics = model, engine, metrics
        self.alias = alias
        self.default_max_tokens = default_max_tokens
        self.token_text = TokenText(model.tokenizer)
        self.created = int(time.time())

    # ---- helpers -------------------------------------------------------------------------------------------

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.alias:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {self.alias!r}",
                           param="model", code="model_not_found")

    def public(self, message: str) -> str:
        """An error message without the server's file paths."""
        source = str(self.model.source)
        for path in (source, str(Path(source).parent)):
            message = message.replace(path, self.alias)
        return message

    def sampling_options(self, body: Sampling, seed: int, max_tokens: int | None) -> dict:
        options = dict(max_tokens=max_tokens or self.default_max_tokens, seed=seed, stop=body.stops)
        for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
            value = getattr(body, name)
            if value is not None:
                options[name] = value
        return options

    async def submit_all(self, requests: list[EngineRequest]) -> list:
        streams = []
        try:
            for r in requests:
                streams.append(await self.engine.submit(r))
        except EngineBusy as err:
            for s in streams:
                s.cancel()
            raise ApiError(503, str(err), headers={"Retry-After": str(err.retry_after)}) from None
        except EngineShutdown as err:
            raise ApiError(503, str(err)) from None
        return streams

    async def until_disconnect(self, request: Request, awaitable):
        """Await `awaitable` unless the client goes away first (then it is cancelled, and so is its work)."""
        task = asyncio.ensure_future(awaitable)

        async def disconnected():
            while (await request.receive())["type"] != "http.disconnect":
                pass

        watcher = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()
        if not task.done() or task.cancelled():
            raise ApiError(499, "the client went away")
        return self.unwrap(task)

    def unwrap(self, task: asyncio.Future):
        try:
            return task.result()
        except FuselmError as err:
            raise ApiError(400, self.public(str(err))) from None
        except EngineShutdown as err:
            raise ApiError(503, str(err)) from None

    async def collect(self, streams: list) -> list[Answer]:
        async def one(stream) -> Answer:
            answer = Answer()
            try:
                async for event in stream:
                    answer.add(event)
            finally:
                stream.cancel()
            return answer

        try:
            return list(await asyncio.gather(*(one(s) for s in streams)))
        finally:
            for s in streams:
                s.cancel()

    async def stream_events(self, request: Request, streams: list, chunks, include_usage: bool) -> Response:
        """Server-sent events; the first event is awaited before the headers so that a bad request is a 4xx."""
        events = merged(streams)
        try:
            first = await self.until_disconnect(request, events.__anext__())
        except BaseException:
            await events.aclose()
            raise

        async def body() -> AsyncIterator[bytes]:
            try:
                for chunk in chunks.on(*first):
                    yield sse(chunk)
                async for i, event in events:
                    for chunk in chunks.on(i, event):
                        yield sse(chunk)
                if include_usage:
                    yield sse(chunks.usage())
            except EngineShutdown as err:
                yield sse(error_body(503, str(err), code="shutdown"))
            except FuselmError as err:
                yield sse(error_body(400, self.public(str(err))))
            finally:
                await events.aclose()
            yield sse("[DONE]")

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def seeds(self, seed: int | None, count: int) -> list[int]:
        """One seed per choice: the request's (random when absent), then the next ones."""
        base = secrets.randbelow(SEED_SPAN) if seed is None else seed
        return [(base + i + SEED_SPAN) % (2 * SEED_SPAN) - SEED_SPAN for i in range(count)]

    def image_options(self) -> dict:
        return {} if self.model.image_tokenizer is None else {"images": "off"}

    # ---- routes --------------------------------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        body = parse_body(await request.body(), CompletionRequest)
        self.check_model(body.model)
        prompts = body.prompt if isinstance(body.prompt, list) and isinstance(body.prompt[0], str) else [body.prompt]
        seeds = iter(self.seeds(body.seed, len(prompts) * body.n))
        requests, echo = [], []
        for prompt in prompts:
            for _ in range(body.n):
                options = {**self.sampling_options(body, next(seeds), body.max_tokens), **self.image_options()}
                requests.append(EngineRequest(prompt, options, top_logprobs=body.logprobs))
                echo.append(self.prompt_text(prompt) if body.echo else None)
        streams = await self.submit_all(requests)
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.stream:
            chunks = CompletionChunks(rid, created, self.alias, len(streams), self.token_text,
                                      body.logprobs is not None, echo)
            return await self.stream_events(request, streams, chunks, body.include_usage)
        answers = await self.until_disconnect(request, self.collect(streams))
        choices = []
        for i, (answer, prefix) in enumerate(zip(answers, echo)):
            prefix = prefix or ""
            logprobs = answer.logprobs(self.token_text).completion(len(prefix)) if body.logprobs is not None else None
            choices.append({"index": i, "text": prefix + answer.text, "logprobs": logprobs,
                            "finish_reason": finish_reason(answer.done)})
        return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": self.alias,
                             "choices": choices, "usage": usage([a.done for a in answers])})

    def prompt_text(self, prompt) -> str:
        return prompt if isinstance(prompt, str) else self.model.tokenizer.decode(prompt)

    def chat_prompt(self, messages: list[Message]) -> tuple[object, tuple[str, ...]]:
        """fuselm's prompt for chat messages: the messages themselves, or (with pictures) text and images."""
        plain = all(isinstance(m.content, str) or all(p.type == "text" for p in m.content) for m in messages)
        converted = []
        for i, m in enumerate(messages):
            role = "system" if m.role == "developer" else m.role
            if plain:
                text = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
                converted.append({"role": role, "content": text})
                continue
            parts = [m.content] if isinstance(m.content, str) else []
            for j, p in enumerate([] if isinstance(m.content, str) else m.content):
                field = f"messages[{i}].content[{j}].image_url.url"
                if p.type == "text":
                    parts.append(p.text)
                elif self.model.image_tokenizer is None:
                    raise ApiError(400, f"{field}: the model {self.alias!r} does not read pictures", param=field)
                else:
                    parts.append(image_from_data_url(p.image_url.url, field))
            converted.append({"role": role, "content": parts})
        if plain:
            return converted, ()
        try:
            return chat_parts(self.model, converted)
        except FuselmError as err:
            raise ApiError(400, self.public(str(err))) from None

    async def chat(self, request: Request) -> Response:
        body = parse_body(await request.body(), ChatRequest)
        self.check_model(body.model)
        images = body.images_mode
        if images != "off" and self.model.image_tokenizer is None:
            raise ApiError(400, f"modalities: the model {self.alias!r} does not draw pictures", param="modalities")
        if images != "off" and body.logprobs:
            raise ApiError(400, "logprobs: not supported together with picture output", param="logprobs")
        prompt, stops = self.chat_prompt(body.messages)
        top = (body.top_logprobs or 0) if body.logprobs else None
        requests = []
        for seed in self.seeds(body.seed, body.n):
            options = self.sampling_options(body, seed, body.token_limit)
            options["stop"] = options["stop"] + stops
            if self.model.image_tokenizer is not None:
                options["images"] = images
                if body.stream and images != "off":  # about 8 partial pictures per picture, as it is drawn
                    options["progress_every"] = max(1, self.model.image_tokenizer.grid[0] // 8)
            requests.append(EngineRequest(prompt, options, top_logprobs=top))
        streams = await self.submit_all(requests)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.stream:
            chunks = ChatChunks(rid, created, self.alias, len(streams), self.token_text, body.logprobs)
            return await self.stream_events(request, streams, chunks, body.include_usage)
        answers = await self.until_disconnect(request, self.collect(streams))
        choices = [{"index": i, "message": {"role": "assistant", "content": a.chat_content()},
                    "logprobs": a.logprobs(self.token_text).chat() if body.logprobs else None,
                    "finish_reason": finish_reason(a.done)} for i, a in enumerate(answers)]
        return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": self.alias,
                             "choices": choices, "usage": usage([a.done for a in answers])})

    async def images(self, request: Request) -> Response:
        body = parse_body(await request.body(), ImageRequest)
        self.check_model(body.model)
        it = self.model.image_tokenizer
        if it is None:
            raise ApiError(400, f"the model {self.alias!r} does not draw pictures (it has no image tokenizer)",
                           param="model")
        size = parse_size(body.size or "auto", (it.size, it.size))
        requests = [EngineRequest(body.prompt, {"images": "only", "image_size": size, "seed": seed})
                    for seed in self.seeds(body.seed, body.n)]
        answers = await self.until_disconnect(request, self.collect(await self.submit_all(requests)))
        if any(not a.images for a in answers):
            raise ApiError(500, "the model ended without finishing a picture")
        return JSONResponse({"created": int(time.time()), "data": [{"b64_json": png_base64(a.images[0])}
                                                                   for a in answers]})

    async def tokenize(self, request: Request) -> Response:
        body = parse_body(await request.body(), TokenizeRequest)
        self.check_model(body.model)
        return JSONResponse({"tokens": self.model.tokenizer.encode(body.content, add_special_tokens=body.add_special)})

    async def detokenize(self, request: Request) -> Response:
        body = parse_body(await request.body(), DetokenizeRequest)
        self.check_model(body.model)
        vocab = self.model.config.vocab_size
        bad = [t for t in body.tokens if t >= vocab]
        if bad:
            raise ApiError(400, f"tokens: ids must be below {vocab}, got {bad[:4]}", param="tokens")
        return JSONResponse({"content": self.model.tokenizer.decode(body.tokens)})

    def model_card(self) -> dict:
        c, it = self.model.config, self.model.image_tokenizer
        meta = {"arch": c.arch, "file_type": self.model.file_type, "context": c.max_position_embeddings,
                "vocab_size": c.vocab_size, "reads_pictures": it is not None, "draws_pictures": it is not None,
                "picture_size": [it.size, it.size] if it is not None else None, "parallel": self.engine.parallel}
        return {"id": self.alias, "object": "model", "created": self.created, "owned_by": "fuselm", "meta": meta}

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def model_info(self, request: Request) -> Response:
        self.check_model(request.path_params["name"])
        return JSONResponse(self.model_card())

    async def health(self, request: Request) -> Response:
        if self.engine.closed:
            return JSONResponse(error_body(503, "shutting down"), status_code=503)
        return JSONResponse({"status": "ok", "model": self.alias, "running": self.engine.running,
                             "waiting": self.engine.waiting})

    async def metrics_page(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=self.metrics.content_type)

    async def index(self, request: Request) -> Response:
        return FileResponse(WEB / "index.html")


async def merged(streams: list) -> AsyncIterator[tuple[int, object]]:
    """(choice index, event) from several streams as they come; an error in one ends all."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream) -> None:
        try:
            async for event in stream:
                await queue.put((i, event))
            await queue.put((i, done))
        except BaseException as err:  # forwarded to the reader, cancellation included
            await queue.put((i, err))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, item = await queue.get()
            if item is done:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for s in streams:
            s.cancel()
        for t in tasks:
            t.cancel()


async def _api_error(request: Request, exc: ApiError) -> Response:
    return exc.response()


async def _http_error(request: Request, exc: HTTPException) -> Response:
    messages = {404: f"no route {request.url.path!r}", 405: f"{request.method} is not allowed on {request.url.path!r}"}
    message = messages.get(exc.status_code, exc.detail)
    return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code, headers=exc.headers)


async def _internal_error(request: Request, exc: Exception) -> Response:
    return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}"), status_code=500)


def create_app(model, engine: Engine, metrics: Metrics, *, alias: str, api_key: str | None = None,
               cors_origin: str | None = None, max_body: int = MAX_BODY, default_max_tokens: int = 256) -> Starlette:
    api = Api(model, engine, metrics, alias=alias, default_max_tokens=default_max_tokens)
    routes = [
        Route("/", api.index, methods=["GET"]),
        Mount("/static", StaticFiles(directory=WEB), name="static"),
        Route("/health", api.health, methods=["GET"]),
        Route("/metrics", api.metrics_page, methods=["GET"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/models/{name:path}", api.model_info, methods=["GET"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/chat/completions", api.chat, methods=["POST"]),
        Route("/v1/images/generations", api.images, methods=["POST"]),
        Route("/tokenize", api.tokenize, methods=["POST"]),
        Route("/detokenize", api.detokenize, methods=["POST"]),
    ]
    known = {r.path for r in routes if isinstance(r, Route)}
    middleware = []
    if cors_origin:
        middleware.append(Middleware(CORSMiddleware, allow_origins=[cors_origin], allow_methods=["GET", "POST"],
                                     allow_headers=["Authorization", "Content-Type"]))
    middleware.append(Middleware(CountRequests, counter=metrics.requests, routes=known))
    middleware.append(Middleware(BodyLimit, limit=max_body))
    if api_key:
        middleware.append(Middleware(ApiKey, key=api_key))
    handlers = {ApiError: _api_error, HTTPException: _http_error, Exception: _internal_error}
    return Starlette(routes=routes, middleware=middleware, exception_handlers=handlers)
