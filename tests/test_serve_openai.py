"""`fuselm serve demo` through the official openai client: every endpoint and option, checked against the
library itself (fuselm.generate at temperature 0, the same seed for pictures), an independent forward pass for
logprobs, and the tokenizer file for /tokenize."""

import base64
import io
import json
import math

import httpx
import openai
import pytest
import torch
from PIL import Image
from serve_process import ServerProcess, metric

import fuselm
from fuselm.demo.world import render, sample_scenes
from fuselm.generation.mixed import _Setup
from fuselm.generation.stream import Done, ImageDone, TextDelta

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def server():
    with ServerProcess("--quiet") as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return fuselm.load("demo")


def library_text(model, prompt, **options) -> tuple[str, Done]:
    events = list(fuselm.generate(model, prompt, **options))
    return "".join(e.text for e in events if isinstance(e, TextDelta)), events[-1]


def picture(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_models_list_and_retrieve(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["demo"]
    assert client.models.retrieve("demo").id == "demo"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_completion_equals_library_at_temperature_0(client, model):
    r = client.completions.create(model="demo", prompt=PROMPT, max_tokens=24, temperature=0)
    text, done = library_text(model, PROMPT, max_tokens=24, temperature=0, images="off")
    assert r.choices[0].text == text
    assert r.usage.prompt_tokens == done.prompt_tokens and r.usage.completion_tokens == done.generated_tokens
    assert r.model == "demo" and "/" not in r.model


def test_prompt_as_token_ids(client, model):
    ids = model.tokenizer.encode(PROMPT)
    by_ids = client.completions.create(model="demo", prompt=ids, max_tokens=12, temperature=0)
    by_text = client.completions.create(model="demo", prompt=PROMPT, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text and by_ids.usage.prompt_tokens == len(ids)


def test_unknown_model_404_then_good_request_on_same_client(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=2)
    assert err.value.body["code"] == "model_not_found"
    assert client.completions.create(model="demo", prompt=PROMPT, max_tokens=2, temperature=0).choices[0].text


def test_stream_completion_with_usage(client, model):
    chunks = list(client.completions.create(model="demo", prompt=PROMPT, max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text, done = library_text(model, PROMPT, max_tokens=24, temperature=0, images="off")
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == done.generated_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_echo_stop_and_max_tokens(client):
    full = client.completions.create(model="demo", prompt=PROMPT, max_tokens=24, temperature=0).choices[0].text
    echoed = client.completions.create(model="demo", prompt=PROMPT, max_tokens=24, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + full
    word = full.split()[2]
    stopped = client.completions.create(model="demo", prompt=PROMPT, max_tokens=24, temperature=0, stop=[word])
    assert stopped.choices[0].text == full[:full.index(word)] and stopped.choices[0].finish_reason == "stop"
    short = client.completions.create(model="demo", prompt=PROMPT, max_tokens=3, temperature=0)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"


def test_completion_logprobs_match_a_forward_pass(client, model):
    r = client.completions.create(model="demo", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    ids = model.tokenizer.encode(PROMPT)
    gen = model.tokenizer.encode(PROMPT + r.choices[0].text)[len(ids):]
    with torch.inference_mode():
        logits = model(torch.tensor([ids + gen]))[0, len(ids) - 1:-1].float()
    # text answers may only hold text tokens: the reference distribution is the softmax over those
    text_mask = _Setup(model, layout="chameleon", images="off", image_size=None, stop_token_ids=None).machine.text_mask
    reference = torch.log_softmax(logits.masked_fill(~text_mask, -math.inf), dim=-1)
    for step, (top, chosen) in enumerate(zip(lp.top_logprobs, lp.token_logprobs)):
        values = sorted(top.values(), reverse=True)
        assert len(values) == 3 and all(v <= 0 for v in values) and sum(math.exp(v) for v in values) <= 1 + 1e-5
        assert chosen == pytest.approx(values[0], abs=1e-6)  # greedy: the sampled token is the best one
        assert values == pytest.approx(reference[step].topk(3).values.tolist(), abs=2e-3)


def test_chat_equals_library_and_stream_shape(client, model):
    messages = [{"role": "user", "content": "draw a red circle"}]
    r = client.chat.completions.create(model="demo", messages=messages, max_completion_tokens=20, temperature=0)
    text, done = library_text(model, messages, max_tokens=20, temperature=0, images="off")
    assert text and r.choices[0].message.content == text and r.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="demo", messages=messages, max_completion_tokens=20,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == done.generated_tokens


def test_max_completion_tokens_is_honoured(client):
    r = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "draw a red circle"}],
                                       max_completion_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_n_choices_and_seeds(client):
    messages = [{"role": "user", "content": "draw a circle"}]
    greedy = client.chat.completions.create(model="demo", messages=messages, n=3, temperature=0, max_tokens=16)
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert len({c.message.content for c in greedy.choices}) == 1
    seeded = [client.chat.completions.create(model="demo", messages=messages, temperature=2, top_p=1, seed=1234,
                                             max_tokens=24, extra_body={"top_k": 0, "min_p": 0})
              .choices[0].message.content for _ in range(2)]
    assert seeded[0] == seeded[1]
    unseeded = {client.chat.completions.create(model="demo", messages=messages, temperature=2, max_tokens=24,
                                               extra_body={"top_k": 0, "min_p": 0}).choices[0].message.content
                for _ in range(4)}
    assert len(unseeded) > 1  # no seed: a fresh random one each time
    streamed = list(client.chat.completions.create(model="demo", messages=messages, n=2, temperature=0, max_tokens=16,
                                                   stream=True))
    texts = ["".join(c.choices[0].delta.content or "" for c in streamed if c.choices and c.choices[0].index == i)
             for i in range(2)]
    assert texts == [greedy.choices[0].message.content] * 2


def test_chat_logprobs(client):
    r = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "draw a circle"}],
                                       temperature=0, max_tokens=8, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) >= 3
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert bytes(t.bytes).decode() == t.token and len(t.top_logprobs) == 2
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob) and t.logprob <= 0


@pytest.mark.parametrize("extra, field", [
    ({"seed": 2 ** 70}, "seed"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": 1.0}, "frequency_penalty"),
    ({"logit_bias": {"5": 1}}, "logit_bias"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"user": "someone"}, "user"),
    ({"temperature": "hot"}, "temperature"),
    ({"n": 10 ** 30}, "n"),
    ({"max_tokens": 3, "max_completion_tokens": 5}, "max_completion_tokens"),
])
def test_unimplemented_or_bad_fields_are_a_400_naming_the_field(client, extra, field):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       extra_body=extra)
    assert err.value.body["param"].startswith(field) and field in err.value.body["message"]


def test_zero_penalties_are_accepted(client):
    r = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       presence_penalty=0, frequency_penalty=0, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_images_generate_b64_equals_library_picture(client, model):
    r = client.images.generate(model="demo", prompt="a red circle on the left", n=1, size="32x32",
                               response_format="b64_json", extra_body={"seed": 7})
    got = picture(r.data[0].b64_json)
    assert got.size == (32, 32)
    events = list(fuselm.generate(model, "a red circle on the left", images="only", image_size=(32, 32), seed=7))
    expected = next(e.image for e in events if isinstance(e, ImageDone))
    assert got.convert("RGB").tobytes() == expected.convert("RGB").tobytes()
    two = client.images.generate(model="demo", prompt="a blue square", n=2, response_format="b64_json")
    assert len(two.data) == 2 and all(picture(d.b64_json).size == (32, 32) for d in two.data)
    with pytest.raises(openai.BadRequestError):
        client.images.generate(model="demo", prompt="a blue square", response_format="url")
    with pytest.raises(openai.BadRequestError):  # 4096x4096 pixels do not fit the demo's context
        client.images.generate(model="demo", prompt="a blue square", size="4096x4096", response_format="b64_json")


def _data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_chat_reads_a_picture(client, model):
    scene = sample_scenes(1, seed=3)[0]
    url = _data_url(render(scene))
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "what is in the picture?"}]}]
    r = client.chat.completions.create(model="demo", messages=messages, temperature=0, max_tokens=24)
    h, w = model.image_tokenizer.grid
    text_only = client.chat.completions.create(model="demo", temperature=0, max_tokens=2, messages=[
        {"role": "user", "content": "what is in the picture?"}])
    assert r.usage.prompt_tokens == text_only.usage.prompt_tokens + h * w + 2  # the picture's tokens, boi, eoi
    assert r.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="demo", max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}])
    assert "data URL" in err.value.body["message"]


def test_chat_draws_pictures_as_content_parts(client, model):
    messages = [{"role": "user", "content": "a red circle on the left"}]
    r = client.chat.completions.create(model="demo", messages=messages, seed=5, extra_body={"modalities": ["image"]})
    parts = r.choices[0].message.content
    assert isinstance(parts, list) and parts[0]["type"] == "image_url"
    url = parts[0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,") and picture(url.split(",", 1)[1]).size == (32, 32)
    events = [json.loads(line[6:]) for line in _raw_stream(client, messages) if line.startswith("data: {")]
    images = [e["choices"][0]["delta"]["image"] for e in events if e["choices"] and "image" in e["choices"][0]["delta"]]
    h, _ = model.image_tokenizer.grid
    assert images[0]["status"] == "start" and images[0]["rows_total"] == h
    progress = [i["rows_done"] for i in images if i["status"] == "progress"]
    assert progress == list(range(1, h + 1)) and any("url" in i for i in images if i["status"] == "progress")
    assert images[-1]["status"] == "done" and images[-1]["url"] == url  # same seed, same picture


def _raw_stream(client, messages) -> list[str]:
    body = {"model": "demo", "messages": messages, "seed": 5, "stream": True, "modalities": ["image"]}
    with httpx.stream("POST", str(client.base_url) + "chat/completions", json=body, timeout=120) as r:
        return list(r.iter_lines())


def test_tokenize_detokenize_health_metrics(server, model):
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(str(fuselm.demo.__path__[0]) + "/weights/tokenizer.json")
    with httpx.Client(base_url=server.url, timeout=60) as http:
        tokens = http.post("/tokenize", json={"content": "a red circle"}).json()["tokens"]
        assert tokens == reference.encode("a red circle", add_special_tokens=False).ids
        assert http.post("/detokenize", json={"tokens": tokens}).json()["content"] == reference.decode(
            tokens, skip_special_tokens=False)
        assert http.get("/health").json()["status"] == "ok"
        page = http.get("/metrics")
        assert page.headers["content-type"].startswith("text/plain")
        assert metric(page.text, "fuselm_tokens_total") > 0
        assert metric(page.text, "fuselm_time_to_first_token_seconds_count") > 0
        for name in ("fuselm_queue_depth", "fuselm_requests_running", "fuselm_batch_occupancy"):
            assert metric(page.text, name) == 0
        assert metric(page.text, "fuselm_requests_total") > 0
