"""`fuselm serve MODEL`: an HTTP server over fuselm.generate (see fuselm.server for the endpoints)."""

from __future__ import annotations

import argparse
import sys

from .common import add_model_args

HELP = """\
Serve one model over HTTP on this machine: OpenAI-style /v1/completions and /v1/chat/completions (with
"stream": true for server-sent events), and /v1/generate for mixed-modal prompts and answers (pictures as
base64 PNG). One request runs at a time. GET /health says what is loaded.

examples:
  fuselm serve                                   the bundled demo model on 127.0.0.1:8080
  fuselm serve model-q4km.gguf --port 9000 --threads 2
  curl -s localhost:8080/v1/completions -d '{"prompt": "a red circle", "max_tokens": 16, "temperature": 0}'
  curl -s localhost:8080/v1/generate -d '{"prompt": "a red circle on the left", "images": "only"}'
"""


def cmd_serve(args) -> int:
    from .common import load_model_from_args
    from ..server import serve

    model = load_model_from_args(args)
    server = serve(model, args.host, args.port, default_max_tokens=args.max_tokens, quiet=args.quiet)
    host, port = server.server_address[:2]
    print(f"serving {model.source} ({model.file_type}) on http://{host}:{port}  (Ctrl-C stops)", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over HTTP (OpenAI-style completions, mixed-modal generate)",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, optional=True)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    p.add_argument("--max-tokens", type=int, default=256, help="default max_tokens of a request (default 256)")
    p.add_argument("--quiet", action="store_true", help="do not log each request")
    p.set_defaults(func=cmd_serve)
