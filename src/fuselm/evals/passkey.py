"""Synthetic passkey retrieval (Mohtashami & Jaggi 2023, as the YaRN paper runs it): can the model find a number
hidden in a long haystack of filler text?

A prompt is: an optional task line, filler sentences repeated, "The pass key is NNNNN. Remember it." at a chosen
depth of the filler, and a question ending right where the key should be written. The model decodes greedily;
a trial is correct when the first integer in its answer is the key. Lengths are in tokens of the model's own
tokenizer, so every model is measured at the context it actually sees.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import FuselmError


@dataclass(frozen=True)
class PasskeyStyle:
    """The words of a passkey prompt. `info` holds `{key}`; `question` ends where the answer begins."""

    task: str
    filler: str  # sentences, each ending with ". ", repeated as the haystack
    info: str
    question: str


_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
STYLES: dict[str, PasskeyStyle] = {
    # The YaRN repository's eval/passkey.py wording.
    "yarn": PasskeyStyle(
        task="There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
             "I will quiz you about the important information there.",
        filler=_FILLER,
        info="The pass key is {key}. Remember it. {key} is the pass key.",
        question="What is the pass key? The pass key is"),
    # No task line and a one-sentence info line: fits small trained contexts (benchmarks/long_context.py).
    "compact": PasskeyStyle(task="", filler=_FILLER, info="The pass key is {key}. Remember it.",
                            question="What is the pass key? The pass key is"),
}
KEY_RANGE = (10000, 100000)  # five-digit keys: every key has the same token count under a digit-level tokenizer


@dataclass(frozen=True)
class PasskeyPrompt:
    ids: list[int]
    key: int
    depth: float  # the requested depth: the share of the filler placed before the info line
    key_position: int  # index in `ids` of the info line's first token
    text: str


@dataclass
class PasskeyResult:
    length: int  # tokens for prompt + answer (the prompt gets length minus the answer budget)
    trials: int
    correct: int
    mean_prompt_tokens: float
    answers: list[tuple[int, float, int | None]] = field(default_factory=list)  # (key, depth, parsed answer)

    @property
    def accuracy(self) -> float:
        return self.correct / self.trials if self.trials else float("nan")


def _sentences(filler: str) -> list[str]:
    parts = [s.strip() for s in re.split(r"(?<=[.!?])\s+", filler.strip()) if s.strip()]
    if not parts:
        raise FuselmError("passkey style: the filler text is empty; expected at least one sentence")
    return parts


def _prompt_text(style: PasskeyStyle, sentences: list[str], n: int, before: int, key: int) -> tuple[str, str]:
    """(whole prompt, the part before the info line) with n filler sentences, `before` of them ahead of the key."""
    hay = [sentences[i % len(sentences)] for i in range(n)]
    head = " ".join(p for p in (style.task, *hay[:before]) if p)
    prefix = head + " " if head else ""
    tail = " ".join(hay[before:])
    body = prefix + style.info.format(key=key) + (" " + tail if tail else "")
    return body + " " + style.question, prefix


def build_passkey_prompt(tokenizer, length: int, depth: float, key: int,
                         style: PasskeyStyle = STYLES["yarn"]) -> PasskeyPrompt:
    """The longest prompt of whole filler sentences that fits in `length` tokens (BOS included when the tokenizer
    adds one), with the info line after round(depth * n) of the n sentences.

    The prompt is at most `length` tokens and within about one filler sentence of it.
    """
    if not 0.0 <= depth <= 1.0:
        raise FuselmError(f"passkey depth is {depth}; expected a number in [0, 1]")
    sentences = _sentences(style.filler)

    def encode(n: int) -> tuple[list[int], str, str]:
        text, prefix = _prompt_text(style, sentences, n, round(depth * n), key)
        return tokenizer.encode(text), text, prefix

    fixed = len(encode(0)[0])
    if fixed > length:
        raise FuselmError(f"passkey length {length} is too short: the prompt without filler already takes "
                          f"{fixed} tokens")
    probe = 4 * len(sentences)
    per_sentence = max((len(encode(probe)[0]) - fixed) / probe, 1e-9)
    n = int((length - fixed) / per_sentence)
    ids, text, prefix = encode(n)
    while len(ids) > length and n > 0:  # the estimate overshot (tokens merge across sentence boundaries)
        n -= 1
        ids, text, prefix = encode(n)
    while True:  # ... or undershot
        more = encode(n + 1)
        if len(more[0]) > length:
            break
        n += 1
        ids, text, prefix = more
    # Tokenizers attach the separating space to the next word ("▁The"), so count the prefix without it.
    key_position = len(tokenizer.encode(prefix.rstrip()))
    return PasskeyPrompt(ids=ids, key=key, depth=depth, key_position=key_position, text=text)


def first_integer(text: str) -> int | None:
    """The first run of digits in the answer, as the YaRN evaluation parses it."""
    m = re.search(r"\d+", text)
    return int(m.group()) if m else None


def _answer_complete(text: str) -> bool:
    return re.search(r"\d+\D", text) is not None


def greedy_continuation(model, ids: Sequence[int], max_new_tokens: int,
                        done: Callable[[list[int]], bool] | None = None) -> list[int]:
    """Greedy tokens after `ids` (prefill, then one token a step through a KV cache) until `done(tokens)`, an
    end-of-sequence token, or max_new_tokens.

    Runs the transformer directly: unlike model(tokens) it does not refuse prompts longer than the model's
    context, because running past the trained length without scaling is the baseline these evaluations measure.
    """
    transformer = model.transformer
    device = transformer.device
    eos = set(model.config.eos_token_ids)
    cache = transformer.new_cache(1, len(ids) + max_new_tokens)
    out: list[int] = []
    with torch.inference_mode():
        logits = transformer(torch.tensor([list(ids)], device=device), cache=cache, last_only=True)
        while len(out) < max_new_tokens:
            token = int(logits[0, -1].argmax())
            out.append(token)
            if token in eos or (done is not None and done(out)):
                break
            if len(out) < max_new_tokens:
                logits = transformer(torch.tensor([[token]], device=device), cache=cache)
    return out


def trial_plan(length: int, trials: int, seed: int) -> tuple[list[int], list[float]]:
    """Keys and depths for one length: stratified depths (one per 1/trials band, jittered), reproducible per
    (seed, length), so every RoPE method sees exactly the same prompts."""
    rng = np.random.default_rng([seed, length])
    keys = rng.integers(*KEY_RANGE, size=trials).tolist()
    depths = ((np.arange(trials) + rng.random(trials)) / trials).tolist()
    return keys, depths


def passkey_accuracy(model, length: int, *, trials: int = 20, seed: int = 0,
                     style: PasskeyStyle = STYLES["yarn"], max_new_tokens: int | None = None,
                     progress: Callable[[], None] | None = None) -> PasskeyResult:
    """Accuracy of greedy passkey retrieval within `length` tokens: the prompt gets `length` minus the answer
    budget (max_new_tokens, default the key's token count + 4), so the answer too lies inside the length.
    `progress()` is called per trial."""
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise FuselmError(f"{getattr(model, 'source', 'model')}: the model has no tokenizer; the passkey "
                          "evaluation needs one to write its prompts")
    if trials < 1:
        raise FuselmError(f"passkey trials is {trials}; expected a positive integer")
    keys, depths = trial_plan(length, trials, seed)
    result = PasskeyResult(length=length, trials=trials, correct=0, mean_prompt_tokens=0.0)
    for key, depth in zip(keys, depths):
        budget = max_new_tokens or len(tokenizer.encode(f" {key}.", add_special_tokens=False)) + 4
        # The whole exchange, prompt and answer, fits in `length` tokens.
        prompt = build_passkey_prompt(tokenizer, length - budget, depth, key, style)
        tokens = greedy_continuation(model, prompt.ids, budget,
                                     done=lambda t: _answer_complete(tokenizer.decode(t, skip_special_tokens=True)))
        answer = first_integer(tokenizer.decode(tokens, skip_special_tokens=True))
        result.correct += answer == key
        result.mean_prompt_tokens += len(prompt.ids) / trials
        result.answers.append((key, depth, answer))
        if progress is not None:
            progress()
    return result
