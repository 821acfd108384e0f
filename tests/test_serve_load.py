"""16 concurrent clients on `fuselm serve demo`: streaming, non-streaming, and clients that go away mid-stream
or before their answer. Every surviving temperature-0 answer equals its solo answer, the server stays up, and
afterwards nothing is left queued or running (read from /metrics)."""

import json
import socket
import threading

import httpx
import openai
import pytest
from serve_process import ServerProcess, metric, wait_until

PROMPTS = ["draw a red circle", "a blue square on the left", "describe the picture", "draw a circle"]
CLIENTS = 16


@pytest.fixture(scope="module")
def server():
    with ServerProcess("--quiet", "--parallel", "4", "--max-queue", "32") as proc:
        yield proc


def chat(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def test_sixteen_clients_mixed(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    solo = {p: client.chat.completions.create(model="demo", messages=chat(p), temperature=0, max_tokens=40)
            .choices[0].message.content for p in PROMPTS}
    solo_completion = {p: client.completions.create(model="demo", prompt=p, temperature=0, max_tokens=40)
                       .choices[0].text for p in PROMPTS}
    assert all(solo.values()) and all(solo_completion.values())  # real answers to compare, not empty ones
    results: dict[int, object] = {}
    errors: list[BaseException] = []
    go = threading.Barrier(CLIENTS)

    def streamed_chat(i: int, p: str) -> str:
        chunks = client.chat.completions.create(model="demo", messages=chat(p), temperature=0, max_tokens=40,
                                                stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    def plain_completion(i: int, p: str) -> str:
        return client.completions.create(model="demo", prompt=p, temperature=0, max_tokens=40).choices[0].text

    def leaves_mid_stream(i: int, p: str) -> str:
        body = {"model": "demo", "messages": chat(p), "stream": True, "modalities": ["image"], "seed": i}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=300) as r:
            for n, _ in enumerate(r.iter_lines()):
                if n >= 3:
                    break  # leaving the block closes the connection mid-stream
        return "left"

    def leaves_before_the_answer(i: int, p: str) -> str:
        body = json.dumps({"model": "demo", "messages": chat(p), "modalities": ["image"], "seed": i}).encode()
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=60) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        return "left"

    kinds = [streamed_chat, plain_completion, leaves_mid_stream, streamed_chat, plain_completion,
             leaves_before_the_answer, streamed_chat, plain_completion]

    def run(i: int) -> None:
        try:
            go.wait()
            results[i] = kinds[i % len(kinds)](i, PROMPTS[i % len(PROMPTS)])
        except BaseException as err:  # reported below with the client's number
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors
    left = 0
    for i in range(CLIENTS):
        kind, prompt = kinds[i % len(kinds)], PROMPTS[i % len(PROMPTS)]
        if kind is streamed_chat:
            assert results[i] == solo[prompt], (i, prompt)
        elif kind is plain_completion:
            assert results[i] == solo_completion[prompt], (i, prompt)
        else:
            left += 1

    def idle() -> bool:
        page = httpx.get(server.url + "/metrics").text
        return metric(page, "fuselm_requests_running") == 0 and metric(page, "fuselm_queue_depth") == 0

    assert wait_until(idle, timeout=30)  # the abandoned pictures were stopped, not drawn to the end
    page = httpx.get(server.url + "/metrics").text
    assert metric(page, "fuselm_cancelled_requests_total") >= left
    assert server.proc.poll() is None and httpx.get(server.url + "/health").json()["status"] == "ok"
    assert "Traceback" not in server.output


def test_full_queue_is_503_with_retry_after():
    with ServerProcess("--quiet", "--parallel", "1", "--max-queue", "1") as proc:
        body = {"model": "demo", "messages": chat("a red circle"), "modalities": ["image"], "seed": 1}
        stop = threading.Event()
        with httpx.Client(base_url=proc.url, timeout=120) as http:
            def keep_busy() -> None:  # three clients posting back to back keep the slot and the queue taken
                while not stop.is_set():
                    http.post("/v1/chat/completions", json=body)

            busy = [threading.Thread(target=keep_busy) for _ in range(3)]
            for t in busy:
                t.start()
            try:
                assert wait_until(lambda: metric(http.get("/metrics").text, "fuselm_queue_depth") == 1, timeout=60)
                answers = []
                for _ in range(20):  # the queue can drain for an instant between two busy posts
                    r = http.post("/v1/chat/completions", json=body)
                    answers.append(r.status_code)
                    if r.status_code == 503:
                        break
                assert r.status_code == 503, answers
                assert int(r.headers["retry-after"]) >= 1
                assert "busy" in r.json()["error"]["message"]
            finally:
                stop.set()
                for t in busy:
                    t.join(120)
