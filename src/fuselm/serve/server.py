"""Run the app on uvicorn: bind (one line of error if that fails), serve, and on SIGINT/SIGTERM stop accepting,
end the in-flight streams with a final event, and return."""

from __future__ import annotations

import signal
import socket
import sys

import uvicorn

from ..errors import FuselmError
from .app import MAX_BODY, create_app
from .engine import Engine
from .metrics import Metrics


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or one FuselmError saying why not."""
    if not 0 <= port <= 65535:
        raise FuselmError(f"--port must be 0..65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as err:
        raise FuselmError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server, ending the engine's streams as soon as a stop signal comes."""

    def __init__(self, config: uvicorn.Config, engine: Engine):
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig, frame) -> None:
        self.engine.close(timeout=0)
        super().handle_exit(sig, frame)


def serve(model, *, alias: str, host: str = "127.0.0.1", port: int = 8080, parallel: int = 4,
          max_queue: int = 64, api_key: str | None = None, cors_origin: str | None = None,
          default_max_tokens: int = 256, max_body: int = MAX_BODY, quiet: bool = False) -> int:
    sock = bind(host, port)
    metrics = Metrics()
    engine = Engine(model, parallel=parallel, queue_size=max_queue, metrics=metrics)
    app = create_app(model, engine, metrics, alias=alias, api_key=api_key, cors_origin=cors_origin,
                     max_body=max_body, default_max_tokens=default_max_tokens)
    config = uvicorn.Config(app, log_level="warning" if quiet else "info", access_log=not quiet,
                            timeout_graceful_shutdown=5, lifespan="off")
    server = _Server(config, engine)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    print(f"serving {alias} on http://{shown}:{bound_port}  (Ctrl-C stops)", file=sys.stderr, flush=True)
    # uvicorn re-raises the stop signal to the previous handler once it is done; make that a no-op so the
    # process ends with status 0 instead of KeyboardInterrupt or a kill by SIGTERM.
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        engine.close(timeout=10)
        for s, handler in previous.items():
            signal.signal(s, handler)
        sock.close()
    return 0
