"""The engine contract the HTTP layer relies on (and continuous batching must keep): events equal to
fuselm.generate's, Sampled tokens before the events they produced, logprobs from the logits, cancellation of
queued and running requests, a bounded queue, and shutdown."""

import asyncio

import pytest
import torch

import fuselm
from fuselm.generation.stream import Done, ImageDone, TextDelta
from fuselm.serve.engine import Engine, EngineBusy, EngineRequest, EngineShutdown, Sampled
from fuselm.serve.metrics import Metrics

PICTURE = EngineRequest("a red circle on the left", {"images": "only", "seed": 1})


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return fuselm.load("demo")


async def collect(stream) -> list:
    return [event async for event in stream]


def test_events_and_logprobs_match_the_library(model):
    async def main():
        engine = Engine(model, metrics=Metrics())
        try:
            options = {"max_tokens": 12, "temperature": 0, "images": "off"}
            return await collect(await engine.submit(EngineRequest("a red circle", options, top_logprobs=2)))
        finally:
            engine.close()

    events = asyncio.run(main())
    reference = list(fuselm.generate(model, "a red circle", max_tokens=12, temperature=0, images="off"))
    plain = [e for e in events if not isinstance(e, Sampled)]
    texts = [e.text for e in plain if isinstance(e, TextDelta)]
    assert texts == [e.text for e in reference if isinstance(e, TextDelta)]
    assert isinstance(plain[-1], Done) and plain[-1].generated_tokens == reference[-1].generated_tokens
    sampled = [e for e in events if isinstance(e, Sampled)]
    ids = [t for s in sampled for t in s.ids]
    assert len(ids) == reference[-1].generated_tokens
    assert model.tokenizer.decode(ids).startswith("".join(e.text for e in plain if isinstance(e, TextDelta)))
    for s in sampled:
        for token, logprob, top in zip(s.ids, s.logprobs, s.top):
            assert top[0] == (token, pytest.approx(logprob))  # greedy: the best token was sampled
            assert top[0][1] >= top[1][1]


def test_cancel_queued_and_running_and_queue_limit(model):
    async def main():
        metrics = Metrics()
        engine = Engine(model, queue_size=1, metrics=metrics)
        try:
            running = await engine.submit(PICTURE)
            first = await running.__anext__()  # it runs now
            queued = await engine.submit(PICTURE)
            with pytest.raises(EngineBusy) as busy:
                await engine.submit(PICTURE)
            assert busy.value.retry_after >= 1
            queued.cancel()
            assert await collect(queued) == []  # ended without running
            running.cancel()
            rest = await collect(running)
            assert not any(isinstance(e, (ImageDone, Done)) for e in [first, *rest])  # stopped mid-picture
            for _ in range(100):
                if engine.running == 0:
                    break
                await asyncio.sleep(0.05)
            assert engine.running == 0 and engine.waiting == 0
            assert metrics.cancelled._value.get() == 2
            done = await collect(await engine.submit(EngineRequest("a red circle", {"max_tokens": 4})))
            assert isinstance(done[-1], Done)  # the engine goes on serving
        finally:
            engine.close()

    asyncio.run(main())


def test_close_ends_open_streams(model):
    async def main():
        engine = Engine(model)
        stream = await engine.submit(PICTURE)
        waiting = await engine.submit(PICTURE)
        await stream.__anext__()
        engine.close()
        for s in (stream, waiting):
            with pytest.raises(EngineShutdown):
                await collect(s)
        with pytest.raises(EngineShutdown):
            await engine.submit(PICTURE)

    asyncio.run(main())
