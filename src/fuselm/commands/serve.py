"""`fuselm serve MODEL`: the OpenAI-style HTTP server (see fuselm.serve)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_model_args

HELP = """\
Serve one model over HTTP: OpenAI-style /v1/models, /v1/completions, /v1/chat/completions (pictures in as
image_url data URLs and out as content parts, streamed with progress), /v1/images/generations (Chameleon
models), /tokenize, /detokenize, /health, /metrics, and a chat page at GET /. Requests name the model by its
alias (--alias; default the file's stem, "demo" for the bundled model).

examples:
  fuselm serve                                   the bundled demo model on http://127.0.0.1:8080
  fuselm serve model-q4km.gguf --port 9000 --threads 2 --api-key secret
  curl -s localhost:8080/v1/completions -H 'Content-Type: application/json' \\
       -d '{"model": "demo", "prompt": "a red circle", "max_tokens": 16, "temperature": 0}'
"""


def alias_for(model_arg: str) -> str:
    if model_arg == "demo":
        return "demo"
    path = Path(model_arg.rstrip("/"))
    return path.stem if path.is_file() else path.name


def cmd_serve(args) -> int:
    from ..serve import serve
    from ..serve.server import bind
    from .common import load_model_from_args

    bind(args.host, args.port).close()  # a bad host or port fails now, before the model loads
    model = load_model_from_args(args)
    return serve(model, alias=args.alias or alias_for(args.model), host=args.host, port=args.port,
                 parallel=args.parallel, max_queue=args.max_queue, api_key=args.api_key,
                 cors_origin=args.cors_origin, default_max_tokens=args.max_tokens, quiet=args.quiet)


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over HTTP (OpenAI-style API with pictures, web page)",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, optional=True)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    p.add_argument("--alias", default=None, help="the model's name in the API (default: the file's stem)")
    p.add_argument("--parallel", type=int, default=4, help="sequences decoded together (default 4)")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait; more get 503 (default 64)")
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY (default: no key)")
    p.add_argument("--cors-origin", default=None, help="allow this browser origin (default: no CORS)")
    p.add_argument("--max-tokens", type=int, default=256, help="max_tokens of a request that names none (256)")
    p.add_argument("--quiet", action="store_true", help="do not log each request")
    p.set_defaults(func=cmd_serve)
