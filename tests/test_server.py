"""`fuselm serve`: the HTTP endpoints return what fuselm.generate gives for the same request, stream it as
server-sent events, and answer bad requests with one clear 400. The bundled demo model serves (it reads and
draws pictures); the reference is the library call itself."""

import base64
import io
import json
import threading
import urllib.error
import urllib.request

import pytest
from PIL import Image

from fuselm import generate, load
from fuselm.demo.world import caption, render, sample_scenes
from fuselm.generation.stream import ImageDone, TextDelta
from fuselm.server import serve


@pytest.fixture(scope="module")
def model():
    return load("demo")


@pytest.fixture(scope="module")
def url(model):
    server = serve(model, port=0, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def post(url: str, body, raw: bool = False):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            text = r.read().decode()
            return r.status, (text if raw else json.loads(text))
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read().decode())


def test_health(url, model):
    with urllib.request.urlopen(url + "/health", timeout=30) as r:
        info = json.loads(r.read())
    assert info == {"status": "ok", "model": model.source, "file_type": model.file_type, "images": True}


def test_completion_equals_generate(url, model):
    prompt = "a red circle"
    status, out = post(url + "/v1/completions", {"prompt": prompt, "max_tokens": 12, "temperature": 0})
    expected = "".join(e.text for e in generate(model, prompt, max_tokens=12, temperature=0, images="off")
                       if isinstance(e, TextDelta))
    assert status == 200 and out["object"] == "text_completion"
    assert out["choices"][0]["text"] == expected
    assert out["usage"]["completion_tokens"] >= 1


def test_streamed_completion_joins_to_the_same_text(url):
    body = {"prompt": "a blue square", "max_tokens": 10, "temperature": 0}
    _, whole = post(url + "/v1/completions", body)
    status, events = post(url + "/v1/completions", {**body, "stream": True}, raw=True)
    lines = [line[len("data: "):] for line in events.split("\n\n") if line.startswith("data: ")]
    assert status == 200 and lines[-1] == "[DONE]"
    chunks = [json.loads(x) for x in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]


def test_generate_captions_and_draws_as_the_library_does(url, model):
    scene = sample_scenes(1, seed=3, split="heldout")[0]
    buf = io.BytesIO()
    render(scene).save(buf, format="PNG")
    picture = base64.b64encode(buf.getvalue()).decode()
    status, out = post(url + "/v1/generate", {"prompt": [{"image": picture}, "<reserved08706>"],
                                              "max_tokens": 32, "temperature": 0})
    expected = "".join(e.text for e in generate(model, [render(scene), "<reserved08706>"], max_tokens=32,
                                                temperature=0) if isinstance(e, TextDelta))
    assert status == 200 and out["parts"] == [{"text": expected}]

    status, out = post(url + "/v1/generate", {"prompt": caption(scene), "images": "only", "seed": 1})
    drawn = [e.image for e in generate(model, caption(scene), images="only", seed=1) if isinstance(e, ImageDone)]
    assert status == 200 and len(out["parts"]) == 1 and out["parts"][0]["image"].startswith("data:image/png;base64,")
    got = Image.open(io.BytesIO(base64.b64decode(out["parts"][0]["image"].split(",", 1)[1])))
    assert got.tobytes() == drawn[0].convert(got.mode).tobytes()


@pytest.mark.parametrize("route, body, message", [
    ("/v1/completions", {"max_tokens": 3}, "'prompt'"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "'temperature': expected float"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"messages": "hi"}, "'messages'"),
    ("/v1/generate", {"prompt": [{"image": "not base64!"}]}, "prompt[0]"),
    ("/v1/generate", {"prompt": "x", "images": "sometimes"}, "'images'"),
    ("/v1/completions", b"{not json", "not valid JSON"),
    ("/v1/nothing", {}, "no route"),
])
def test_bad_requests_get_one_clear_error(url, route, body, message):
    status, out = post(url + route, body)
    assert status in (400, 404) and message in out["error"]["message"], out
