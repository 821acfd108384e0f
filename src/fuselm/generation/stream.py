"""The events a generation streams, and incremental detokenization with stop strings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class ImageStart:
    height: int  # token grid rows
    width: int  # token grid columns
    index: int = 0


@dataclass(frozen=True)
class ImageProgress:
    rows_done: int
    rows_total: int
    partial: Any = None  # PIL.Image of the rows drawn so far (rest blank), when decoded


@dataclass(frozen=True)
class ImageDone:
    image: Any  # PIL.Image
    codes: Any = None  # LongTensor [h*w] codebook indices
    index: int = 0


@dataclass(frozen=True)
class Done:
    reason: str  # "eos" | "stop" | "length" | "context"
    prompt_tokens: int = 0
    generated_tokens: int = 0
    timings: dict = field(default_factory=dict)


Event = TextDelta | ImageStart | ImageProgress | ImageDone | Done


class TextStream:
    """Turns a growing list of token ids into text deltas, holding back what may still become a stop string
    or an incomplete UTF-8 character."""

    def __init__(self, decode, stop_strings: tuple[str, ...] = ()):
        self.decode = decode
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.ids: list[int] = []
        self.emitted = 0  # characters of decoded text already sent
        self.stopped = False

    def _held_back(self, text: str) -> int:
        """How many trailing characters might be the start of a stop string."""
        hold = 0
        for s in self.stop_strings:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        return hold

    def push(self, token_ids: list[int]) -> str:
        """Add tokens; return the newly final text ('' if nothing). Sets `stopped` on a stop string."""
        self.ids.extend(token_ids)
        text = self.decode(self.ids)
        for s in self.stop_strings:
            at = text.find(s, max(0, self.emitted - len(s)))
            if at != -1:
                self.stopped = True
                out = text[self.emitted:at]
                self.emitted = at
                return out
        end = len(text)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
            end -= 1
        end -= self._held_back(text[:end])
        out = text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return out

    def flush(self) -> str:
        if self.stopped:
            return ""
        text = self.decode(self.ids)
        out = text[self.emitted:]
        self.emitted = len(text)
        return out
