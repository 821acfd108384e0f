"""A small HTTP server over fuselm.generate: OpenAI-style text endpoints plus one mixed-modal endpoint.

Standard library only (http.server). One model, one request at a time (a CPU runs one decode well; requests
wait on a lock). Endpoints:

  GET  /health                 {"status": "ok", "model": ..., "file_type": ..., "images": bool}
  POST /v1/completions         {"prompt": str, "max_tokens", "temperature", "top_k", "top_p", "min_p", "seed",
                                "stop", "stream"} -> OpenAI text_completion (or server-sent events with "stream")
  POST /v1/chat/completions    {"messages": [{"role", "content"}], ...} -> OpenAI chat.completion (or events)
  POST /v1/generate            {"prompt": [str | {"image": "<base64 PNG>"}], "images": "off|on|only", ...}
                               -> {"parts": [{"text": ...} | {"image": "data:image/png;base64,..."}], ...}

Bad requests get HTTP 400 with {"error": {"message": ...}} naming the field and what was expected.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .errors import FuselmError
from .generation.generate import generate
from .generation.stream import Done, ImageDone, TextDelta

SAMPLING_FIELDS = {"temperature": float, "top_k": int, "top_p": float, "min_p": float, "seed": int,
                   "repetition_penalty": float}
MAX_BODY = 32 << 20


class BadRequest(Exception):
    pass


def _field(body: dict, name: str, kind: type, default=None):
    value = body.get(name, default)
    if value is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise BadRequest(f"field {name!r}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def generation_options(body: dict, default_max_tokens: int) -> dict:
    """Keyword arguments for fuselm.generate from a request body (unknown sampler fields are ignored)."""
    options = {name: _field(body, name, kind) for name, kind in SAMPLING_FIELDS.items()}
    options = {k: v for k, v in options.items() if v is not None}
    options["max_tokens"] = _field(body, "max_tokens", int, default_max_tokens)
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise BadRequest("field 'stop': expected a string or a list of strings")
    options["stop"] = tuple(stop)
    return options


def _decode_image(item: dict, index: int):
    from PIL import Image

    data = item.get("image")
    if not isinstance(data, str):
        raise BadRequest(f"prompt[{index}]: expected a string or {{'image': '<base64 PNG or JPEG>'}}")
    if data.startswith("data:"):
        data = data.split(",", 1)[-1]
    try:
        return Image.open(io.BytesIO(base64.b64decode(data, validate=True))).convert("RGB")
    except Exception as err:  # PIL raises many kinds for bad bytes
        raise BadRequest(f"prompt[{index}]: not a readable base64 image ({err})") from None


def _png_data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class FuselmServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], model, *, default_max_tokens: int = 256, quiet: bool = False):
        super().__init__(address, Handler)
        self.model = model
        self.default_max_tokens = default_max_tokens
        self.quiet = quiet
        self.lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    server: FuselmServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:
        if not self.server.quiet:
            super().log_message(format, *args)

    # ------------------------------------------------------------------------------------------- plumbing
    def _send_json(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        self._send_json(status, {"error": {"message": message, "code": status}})

    def _read_body(self) -> dict:
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise BadRequest("Content-Length is not a number") from None
        if length <= 0 or length > MAX_BODY:
            raise BadRequest(f"expected a JSON body of 1 to {MAX_BODY} bytes, got {length}")
        try:
            body = json.loads(self.rfile.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BadRequest(f"the body is not valid JSON ({err})") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        return body

    def _start_events(self) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

    def _event(self, payload) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload)
        self.wfile.write(f"data: {data}\n\n".encode())
        self.wfile.flush()

    # ------------------------------------------------------------------------------------------- routes
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.rstrip("/") in ("/health", ""):
            m = self.server.model
            self._send_json(HTTPStatus.OK, {"status": "ok", "model": m.source, "file_type": m.file_type,
                                            "images": m.image_tokenizer is not None})
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no route {self.path!r}; try GET /health or POST /v1/completions, "
                                              "/v1/chat/completions, /v1/generate")

    def do_POST(self) -> None:  # noqa: N802
        routes = {"/v1/completions": self._completions, "/v1/chat/completions": self._chat,
                  "/v1/generate": self._generate}
        route = routes.get(self.path.rstrip("/"))
        if route is None:
            self._error(HTTPStatus.NOT_FOUND, f"no route {self.path!r}; POST routes: {', '.join(routes)}")
            return
        try:
            body = self._read_body()
            with self.server.lock:
                route(body)
        except (BadRequest, FuselmError) as err:
            self._error(HTTPStatus.BAD_REQUEST, str(err))

    def _text_request(self, body: dict, prompt, kind: str) -> None:
        options = generation_options(body, self.server.default_max_tokens)
        stream = _field(body, "stream", bool, False)
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        model_name = self.server.model.source
        obj = "chat.completion" if kind == "chat" else "text_completion"
        events = generate(self.server.model, prompt, **options)
        events = itertools.chain([next(events)], events)  # request errors surface here, before any header is sent
        if stream:

            def chunk(text: str | None, finish: str | None) -> dict:
                piece = ({} if text is None else {"content": text}) if kind == "chat" else {"text": text or ""}
                return {"id": rid, "object": obj + (".chunk" if kind == "chat" else ""), "created": created,
                        "model": model_name, "choices": [{"index": 0, **({"delta": piece} if kind == "chat" else piece),
                                                          "finish_reason": finish}]}

            self._start_events()
            for event in events:
                if isinstance(event, TextDelta):
                    self._event(chunk(event.text, None))
                elif isinstance(event, Done):
                    self._event(chunk(None, _finish(event.reason)))
            self._event("[DONE]")
            return
        text, done = [], None
        for event in events:
            if isinstance(event, TextDelta):
                text.append(event.text)
            elif isinstance(event, Done):
                done = event
        choice = ({"message": {"role": "assistant", "content": "".join(text)}} if kind == "chat"
                  else {"text": "".join(text)})
        self._send_json(HTTPStatus.OK, {
            "id": rid, "object": obj, "created": created, "model": model_name,
            "choices": [{"index": 0, **choice, "finish_reason": _finish(done.reason if done else "length")}],
            "usage": _usage(done)})

    def _completions(self, body: dict) -> None:
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise BadRequest("field 'prompt': expected a non-empty string")
        self._text_request(body, prompt, "text")

    def _chat(self, body: dict) -> None:
        messages = body.get("messages")
        ok = isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages)
        if not ok:
            raise BadRequest("field 'messages': expected a non-empty list of {'role': str, 'content': str}")
        self._text_request(body, [{"role": m["role"], "content": m["content"]} for m in messages], "chat")

    def _generate(self, body: dict) -> None:
        model = self.server.model
        raw = body.get("prompt")
        raw = [raw] if isinstance(raw, str) else raw
        if not isinstance(raw, list) or not raw:
            raise BadRequest("field 'prompt': expected a string or a list of strings and {'image': base64}")
        prompt = [p if isinstance(p, str) else _decode_image(p if isinstance(p, dict) else {}, i)
                  for i, p in enumerate(raw)]
        images = _field(body, "images", str, "off")
        if images not in ("off", "on", "only"):
            raise BadRequest(f"field 'images': expected 'off', 'on' or 'only', got {images!r}")
        if (images != "off" or any(not isinstance(p, str) for p in prompt)) and model.image_tokenizer is None:
            raise BadRequest(f"{model.source} has no image tokenizer: it can neither read nor draw pictures")
        options = generation_options(body, self.server.default_max_tokens)
        if model.image_tokenizer is not None:
            options["images"] = images
        parts, done = [], None
        for event in generate(model, prompt, **options):
            if isinstance(event, TextDelta):
                if parts and "text" in parts[-1]:
                    parts[-1]["text"] += event.text
                else:
                    parts.append({"text": event.text})
            elif isinstance(event, ImageDone):
                parts.append({"image": _png_data_url(event.image)})
            elif isinstance(event, Done):
                done = event
        self._send_json(HTTPStatus.OK, {"parts": parts, "finish_reason": _finish(done.reason if done else "length"),
                                        "usage": _usage(done)})


def _finish(reason: str) -> str:
    return {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}.get(reason, reason)


def _usage(done: Done | None) -> dict:
    if done is None:
        return {}
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.generated_tokens,
            "total_tokens": done.prompt_tokens + done.generated_tokens}


def serve(model, host: str = "127.0.0.1", port: int = 8080, *, default_max_tokens: int = 256,
          quiet: bool = False) -> FuselmServer:
    """A started-up (not yet serving) server; call .serve_forever(), and .server_close() when done."""
    try:
        return FuselmServer((host, port), model, default_max_tokens=default_max_tokens, quiet=quiet)
    except OSError as err:
        raise FuselmError(f"cannot listen on {host}:{port} ({err.strerror})") from None
