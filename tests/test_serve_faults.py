"""Bad requests against `fuselm serve demo`: each gets one clear 4xx in OpenAI's error shape and the connection
stays usable; plus the API key, CORS, the body limit, bad ports, and stopping with SIGINT/SIGTERM mid-stream."""

import http.client
import json
import signal
import subprocess
import sys
import threading

import httpx
import openai
import pytest
from serve_process import ServerProcess

GOOD = {"model": "demo", "prompt": "a red circle", "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def server():
    with ServerProcess("--quiet") as proc:
        yield proc


def is_error(response_body: bytes, status: int) -> dict:
    body = json.loads(response_body)
    assert set(body) == {"error"} and body["error"]["message"], body
    assert set(body["error"]) >= {"message", "type", "param", "code"}
    return body["error"]


FAULTS = [
    ("POST", "/v1/completions", b'{"model": "demo", "prompt": ', 400, "not valid JSON"),
    ("POST", "/v1/completions", b'[1, 2]', 400, "JSON object"),
    ("POST", "/v1/completions", b'{"model": "demo", "prompt": "x", "max_tokens": NaN}', 400, "NaN"),
    ("POST", "/v1/completions", json.dumps({**GOOD, "max_tokens": "3"}).encode(), 400, "max_tokens"),
    ("POST", "/v1/completions", json.dumps({**GOOD, "max_tokens": 10 ** 40}).encode(), 400, "max_tokens"),
    ("POST", "/v1/completions", b'{"model": "demo", "prompt": "x", "temperature": 1e400}', 400, "temperature"),
    ("POST", "/v1/completions", json.dumps({**GOOD, "seed": -(2 ** 90)}).encode(), 400, "seed"),
    ("POST", "/v1/completions", json.dumps({**GOOD, "stream": "yes"}).encode(), 400, "stream"),
    ("POST", "/v1/completions", json.dumps({**GOOD, "prompt": ""}).encode(), 400, "prompt"),
    ("POST", "/v1/completions", json.dumps({**GOOD, "prompt": "x" * 5000}).encode(), 400, "context"),
    ("POST", "/v1/completions", json.dumps({"prompt": "x"}).encode(), 400, "model"),
    ("POST", "/v1/chat/completions", json.dumps({"model": "demo", "messages": [{"role": "robot",
                                                                                 "content": "x"}]}).encode(),
     400, "messages[0].role"),
    ("POST", "/v1/chat/completions", json.dumps({"model": "demo", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!"}}]}]}).encode(), 400, "base64"),
    ("POST", "/detokenize", json.dumps({"tokens": [10 ** 9]}).encode(), 400, "tokens"),
    ("GET", "/v1/nothing-here", b"", 404, "no route"),
    ("DELETE", "/v1/chat/completions", b"", 405, "DELETE"),
    ("GET", "/v1/completions", b"", 405, "GET"),
    ("OPTIONS", "/v1/completions", b"", 405, "OPTIONS"),  # CORS is off by default
]


def test_faults_on_one_keep_alive_connection(server):
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.connect()
    sock = conn.sock
    for method, path, body, status, words in FAULTS:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        error = is_error(r.read(), status)
        assert r.status == status, (path, body[:60], error)
        assert words in error["message"], (words, error)
        conn.request("POST", "/v1/completions", body=json.dumps(GOOD), headers={"Content-Type": "application/json"})
        ok = conn.getresponse()
        assert ok.status == 200 and json.loads(ok.read())["choices"][0]["text"]
        assert conn.sock is sock  # the same connection throughout: nothing desynced
    conn.close()


def test_no_paths_in_errors(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        r = http.post("/v1/completions", json={**GOOD, "prompt": "x" * 5000})
        assert r.status_code == 400 and "weights" not in r.text and "/work" not in r.text


def test_oversized_body_is_413_then_the_client_goes_on(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        big = b'{"model": "demo", "prompt": "' + b"x" * (17 << 20) + b'"}'
        r = http.post("/v1/completions", content=big, headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "limit" in is_error(r.content, 413)["message"]

        def chunks():  # no Content-Length: the limit is applied while the body arrives
            for _ in range(20):
                yield b"x" * (1 << 20)

        r = http.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        assert http.post("/v1/completions", json=GOOD).status_code == 200


def test_api_key_and_cors():
    with ServerProcess("--quiet", "--api-key", "s3cret", "--cors-origin", "http://example.org") as proc:
        with httpx.Client(base_url=proc.url, timeout=60) as http:
            r = http.post("/v1/completions", json=GOOD)
            assert r.status_code == 401 and is_error(r.content, 401)
            assert http.post("/v1/completions", json=GOOD, headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert http.get("/health").status_code == 200 and http.get("/").status_code == 200
            pre = http.options("/v1/chat/completions", headers={
                "Origin": "http://example.org", "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type"})
            assert pre.status_code == 200
            assert pre.headers["access-control-allow-origin"] == "http://example.org"
            other = http.options("/v1/chat/completions", headers={"Origin": "http://evil.example",
                                                                  "Access-Control-Request-Method": "POST"})
            assert "access-control-allow-origin" not in other.headers
        client = openai.OpenAI(base_url=proc.url + "/v1", api_key="s3cret", max_retries=0)
        assert client.completions.create(**GOOD).choices[0].text
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=proc.url + "/v1", api_key="nope", max_retries=0).models.list()


@pytest.mark.parametrize("args, words", [(["--port", "99999"], "--port"), (["--host", "no.such.host.invalid"],
                                                                             "cannot listen")])
def test_bad_port_or_host_is_one_line(args, words):
    r = subprocess.run([sys.executable, "-m", "fuselm", "serve", "demo", *args], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in r.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_stop_signal_ends_streams_with_a_final_event_and_exits_0(sig):
    proc = ServerProcess()
    try:
        body = {"model": "demo", "messages": [{"role": "user", "content": "a red circle"}], "stream": True,
                "modalities": ["image"], "seed": 1}
        lines: list[str] = []
        started = threading.Event()

        def read():
            with httpx.stream("POST", proc.url + "/v1/chat/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    lines.append(line)
                    started.set()

        reader = threading.Thread(target=read)
        reader.start()
        assert started.wait(60)
        assert proc.stop(sig) == 0
        reader.join(30)
        events = [line[6:] for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])
        assert last["error"]["code"] == "shutdown"  # a picture takes longer than the signal to arrive
        assert "Traceback" not in proc.output and "terminate called" not in proc.output
    finally:
        proc.kill()
