"""OpenAI response objects from fuselm events: choices, chunks, usage, logprobs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..generation.stream import Done, ImageDone, ImageProgress, ImageStart, TextDelta
from .engine import Sampled
from .images import png_data_url

FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}


def finish_reason(done: Done | None) -> str:
    return FINISH.get(done.reason, done.reason) if done is not None else "length"


def usage(dones: list[Done | None]) -> dict:
    prompt = sum(d.prompt_tokens for d in dones if d is not None)
    completion = sum(d.generated_tokens for d in dones if d is not None)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(payload) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()


class TokenText:
    """The text a token adds after the one before it (SentencePiece pieces need their left neighbour to show
    their leading space)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, token: int, prev: int | None) -> str:
        if self.tokenizer is None:
            return f"<{token}>"
        if prev is None:
            return self.tokenizer.decode([token])
        return self.tokenizer.decode([prev, token])[len(self.tokenizer.decode([prev])):]


@dataclass
class Logprobs:
    """Sampled tokens and their logprobs, turned into OpenAI's two formats."""
    text: TokenText
    entries: list[tuple[int, float, tuple]] = field(default_factory=list)  # (id, logprob, top) not yet sent
    prev: int | None = None

    def add(self, sampled: Sampled) -> None:
        if sampled.logprobs is not None:
            self.entries += list(zip(sampled.ids, sampled.logprobs, sampled.top))

    def drop_stop_token(self, done: Done) -> None:
        if done.reason == "eos" and self.entries:  # the end-of-sequence token is sampled but not part of the text
            self.entries.pop()

    def _take(self) -> list[tuple[str, float, list[tuple[str, float]]]]:
        out = []
        for token, logprob, top in self.entries:
            out.append((self.text(token, self.prev), logprob, [(self.text(t, self.prev), lp) for t, lp in top]))
            self.prev = token
        self.entries = []
        return out

    def chat(self) -> dict:
        def item(s: str, lp: float) -> dict:
            return {"token": s, "logprob": lp, "bytes": list(s.encode())}
        return {"content": [{**item(s, lp), "top_logprobs": [item(t, v) for t, v in top]}
                            for s, lp, top in self._take()]}

    def completion(self, offset: int) -> dict:
        tokens, logprobs, tops, offsets = [], [], [], []
        for s, lp, top in self._take():
            tokens.append(s)
            logprobs.append(lp)
            tops.append(dict(top))
            offsets.append(offset)
            offset += len(s)
        return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}


@dataclass
class Answer:
    """One choice's events, gathered for a non-streamed response."""
    parts: list = field(default_factory=list)  # str and PIL images, in order
    sampled: list[Sampled] = field(default_factory=list)
    done: Done | None = None

    def add(self, event) -> None:
        if isinstance(event, Sampled):
            self.sampled.append(event)
        elif isinstance(event, TextDelta):
            if self.parts and isinstance(self.parts[-1], str):
                self.parts[-1] += event.text
            else:
                self.parts.append(event.text)
        elif isinstance(event, ImageDone):
            self.parts.append(event.image)
        elif isinstance(event, Done):
            self.done = event

    @property
    def text(self) -> str:
        return "".join(p for p in self.parts if isinstance(p, str))

    @property
    def images(self) -> list:
        return [p for p in self.parts if not isinstance(p, str)]

    def logprobs(self, text: TokenText) -> Logprobs:
        lp = Logprobs(text)
        for s in self.sampled:
            lp.add(s)
        if self.done is not None:
            lp.drop_stop_token(self.done)
        return lp

    def chat_content(self) -> str | list[dict]:
        """A string for text; with pictures, a list of content parts (text and image_url data URLs)."""
        if not self.images:
            return self.text
        return [{"type": "text", "text": p} if isinstance(p, str)
                else {"type": "image_url", "image_url": {"url": png_data_url(p)}} for p in self.parts]


class ChatChunks:
    """chat.completion.chunk objects for a streamed chat: role first, then content (with logprobs when asked),
    picture events as `delta.image`, a finish chunk per choice, and the usage chunk."""

    def __init__(self, rid: str, created: int, model: str, n: int, token_text: TokenText, logprobs: bool):
        self.head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
        self.logprobs = logprobs
        self.lp = [Logprobs(token_text) for _ in range(n)]
        self.started = [False] * n
        self.image_index = [0] * n
        self.dones: list[Done | None] = [None] * n

    def _chunk(self, i: int, delta: dict, finish: str | None = None, logprobs: dict | None = None) -> dict:
        return {**self.head, "choices": [{"index": i, "delta": delta, "logprobs": logprobs,
                                          "finish_reason": finish}]}

    def on(self, i: int, event) -> list[dict]:
        out = []
        if not self.started[i]:
            self.started[i] = True
            out.append(self._chunk(i, {"role": "assistant", "content": ""}))
        if isinstance(event, Sampled):
            self.lp[i].add(event)
        elif isinstance(event, TextDelta):
            out.append(self._chunk(i, {"content": event.text}, logprobs=self.lp[i].chat() if self.logprobs else None))
        elif isinstance(event, ImageStart):
            self.image_index[i] = event.index
            out.append(self._chunk(i, {"image": {"index": event.index, "status": "start", "rows_done": 0,
                                                 "rows_total": event.height, "columns": event.width}}))
        elif isinstance(event, ImageProgress):
            image = {"index": self.image_index[i], "status": "progress", "rows_done": event.rows_done,
                     "rows_total": event.rows_total}
            if event.partial is not None:
                image["url"] = png_data_url(event.partial)
            out.append(self._chunk(i, {"image": image}))
        elif isinstance(event, ImageDone):
            out.append(self._chunk(i, {"image": {"index": event.index, "status": "done",
                                                 "url": png_data_url(event.image)}}))
        elif isinstance(event, Done):
            self.dones[i] = event
            self.lp[i].drop_stop_token(event)
            logprobs = self.lp[i].chat() if self.logprobs else None
            out.append(self._chunk(i, {}, finish=finish_reason(event), logprobs=logprobs))
        return out

    def usage(self) -> dict:
        return {**self.head, "choices": [], "usage": usage(self.dones)}


class CompletionChunks:
    """text_completion objects for a streamed completion (echoed prompt first when asked)."""

    def __init__(self, rid: str, created: int, model: str, n: int, token_text: TokenText, logprobs: bool,
                 echo: list[str | None]):
        self.head = {"id": rid, "object": "text_completion", "created": created, "model": model}
        self.logprobs = logprobs
        self.lp = [Logprobs(token_text) for _ in range(n)]
        self.echo = echo
        self.offset = [0] * n
        self.dones: list[Done | None] = [None] * n

    def _chunk(self, i: int, text: str, finish: str | None = None) -> dict:
        logprobs = self.lp[i].completion(self.offset[i]) if self.logprobs else None
        self.offset[i] += len(text)
        return {**self.head, "choices": [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}]}

    def on(self, i: int, event) -> list[dict]:
        out = []
        if self.echo[i] is not None:
            self.offset[i] += len(self.echo[i])
            out.append({**self.head, "choices": [{"index": i, "text": self.echo[i], "logprobs": None,
                                                  "finish_reason": None}]})
            self.echo[i] = None
        if isinstance(event, Sampled):
            self.lp[i].add(event)
        elif isinstance(event, TextDelta):
            out.append(self._chunk(i, event.text))
        elif isinstance(event, Done):
            self.dones[i] = event
            self.lp[i].drop_stop_token(event)
            out.append(self._chunk(i, "", finish=finish_reason(event)))
        return out

    def usage(self) -> dict:
        return {**self.head, "choices": [], "usage": usage(self.dones)}
