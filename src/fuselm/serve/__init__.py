"""`fuselm serve`: an OpenAI-style HTTP server with pictures both ways and a web page.

app.py (routes), openai_schema.py (request validation), engine.py (scheduling), responses.py (OpenAI objects),
images.py (data URLs, PNG), metrics.py (Prometheus), middleware.py (body limit, API key), server.py (uvicorn),
web/ (the page at GET /).
"""

from .server import serve

__all__ = ["serve"]
