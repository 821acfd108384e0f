"""Mixed-modal generation: text and images in one token stream (Chameleon, Anole, Lumina-mGPT).

One KV cache holds the sequence. At each begin-of-image, when guidance is on, the guidance contexts (Meta: the
context with its text removed, and `[bos]`; Lumina: nothing before boi) take cache rows of their own and are
prefilled with the image so far; every image token then costs one batched forward over the main row and them
(each row attends over its own keys). At end-of-image the guidance rows are released. The main row is never
re-prefilled at a modality switch (Meta's reference re-prefills the whole context at each switch).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import torch
from PIL import Image

from ..errors import FuselmError
from ..vision import ImageVocab
from .decoder import Decoder, LogitsProcessor, SequenceRun, generator_for, new_state, next_token, run_alone
from .processors import (
    IMAGES_MODES,
    LATENT_PER_GRID,
    ClassifierFreeGuidance,
    ImageLayout,
    ModalityMachine,
    TokenRoles,
)
from .prompt import DEFAULT_SAMPLING, default_stop_ids, encode_prompt, has_images, is_chat
from .sampling import SamplingParams
from .stream import Done, Event, ImageDone, ImageProgress, ImageStart, TextDelta, TextStream
from .text import TextRun

LAYOUTS = ("chameleon", "lumina")
# Meta's Options.Text / Options.Image defaults; Lumina-mGPT's inference defaults (text_top_k 10, image_top_k 2000).
META_TEXT = SamplingParams(temperature=0.7, top_p=0.9, repetition_penalty=1.2)
META_IMAGE = SamplingParams(temperature=0.7, top_p=0.9)
LUMINA_TEXT = SamplingParams(temperature=1.0, top_k=10)
LUMINA_IMAGE = SamplingParams(temperature=1.0, top_k=2000)
PARTIAL_BACKGROUND = (255, 255, 255)


def prepare_mixed(model, prompt, *, max_tokens: int = 256, sampling: SamplingParams | None = None,
                   seed: int | None = 0, stop: Sequence[str] = (), stop_token_ids: Sequence[int] | None = None,
                   processors: Sequence[LogitsProcessor] = (), images: str = "off", layout: str = "chameleon",
                   image_size: tuple[int, int] | None = None, cfg: str | None = None, cfg_text: float = 3.0,
                   cfg_image: float = 1.2, cfg_scale: float = 3.0, text_sampling: SamplingParams | None = None,
                   image_sampling: SamplingParams | None = None, progress_every: int = 8,
                   **unknown) -> SequenceRun:
    """The run that streams TextDelta / ImageStart / ImageProgress / ImageDone events, then Done.

    prompt: a string, chat messages, token ids, or a list of strings and PIL images (images are tokenized with
    `model.image_tokenizer` and placed as boi + tokens + eoss).
    images: "off" (text only), "on" (the model may start an image when one still fits), "only" (boi is appended
    to the prompt; one image, then stop; `max_tokens` is not used).
    layout: "chameleon" (h*w tokens) or "lumina" (size tokens and a row-end token after each row).
    image_size: (height, width) in pixels of generated images. Default: the image tokenizer's size; with the
    Lumina layout None lets the model choose (up to the tokenizer's area, aspect ratio up to 4).
    cfg: "meta" (3-way, cfg_text, cfg_image), "lumina" (2-way, cfg_scale) or "off"; default follows the layout.
    text_sampling / image_sampling: per-modality sampler settings. `sampling` (what fuselm.generate passes)
    is used for text when it is not the generic default; otherwise the layout's defaults apply (Meta: temperature
    0.7, top-p 0.9, repetition penalty 1.2 for text; Lumina: top-k 10 for text, top-k 2000 for images).
    progress_every: ImageProgress comes after every row; every this many rows it carries a partial picture
    (0: never).
    """
    if unknown:
        raise FuselmError(f"unknown generation option(s) {sorted(unknown)}; image options are images, layout, "
                          "image_size, cfg, cfg_text, cfg_image, cfg_scale, text_sampling, image_sampling, "
                          "progress_every")
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise FuselmError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    if images not in IMAGES_MODES:
        raise FuselmError(f"images must be one of {IMAGES_MODES}, got {images!r}")
    if layout not in LAYOUTS:
        raise FuselmError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not isinstance(progress_every, int) or progress_every < 0:
        raise FuselmError(f"progress_every must be an integer >= 0, got {progress_every!r}")
    it = model.image_tokenizer
    if it is None:
        if images != "off" or has_images(prompt):
            raise FuselmError(f"{model.source}: images={images!r} and image prompts need a model with an image "
                              "tokenizer (Chameleon)")
        ids, template_stops = encode_prompt(model, prompt)
        return TextRun(model, ids, max_tokens=max_tokens, sampling=sampling or DEFAULT_SAMPLING, seed=seed,
                       stop=tuple(stop) + template_stops, stop_token_ids=stop_token_ids, processors=processors)

    setup = _Setup(model, layout=layout, images=images, image_size=image_size, stop_token_ids=stop_token_ids)
    ids, template_stops = _encode(model, prompt, setup)
    if images == "only" and ids[-1] != setup.roles.boi:
        ids.append(setup.roles.boi)
    setup.machine.start(ids)
    if setup.machine.in_image and images == "off":
        raise FuselmError("the prompt ends inside an image (a begin-of-image with no end), but images='off'")
    capacity = _capacity(model, ids, max_tokens, setup)
    kind = cfg or ("meta" if layout == "chameleon" else "lumina")
    guidance = None
    if kind != "off":
        guidance = ClassifierFreeGuidance(setup.machine, kind, text_scale=cfg_text, image_scale=cfg_image,
                                          scale=cfg_scale)
        guidance = None if guidance.is_identity else guidance
    default = sampling is None
    text_params = text_sampling or ((META_TEXT if layout == "chameleon" else LUMINA_TEXT) if default else sampling)
    image_params = image_sampling or (META_IMAGE if layout == "chameleon" else LUMINA_IMAGE)
    return MixedRun(model, setup, ids, capacity=capacity, guidance=guidance, processors=processors, seed=seed,
                    text_params=text_params, image_params=image_params, stop=tuple(stop) + template_stops,
                    progress_every=progress_every, max_tokens=max_tokens)


def generate_mixed(model, prompt, **options) -> Iterator[Event]:
    """Stream the events of prepare_mixed's run, decoding alone."""
    yield from run_alone(prepare_mixed(model, prompt, **options), model.transformer)


def model_vocab(model) -> dict[str, int]:
    """Token name -> id, from the tokenizer or (tokenizer-less HF dirs) the config's vocabulary_map."""
    if model.tokenizer is not None:
        return model.tokenizer.vocab()
    vocab = model.config.extra.get("vocabulary_map")
    if not vocab:
        raise FuselmError(f"{model.source}: no tokenizer and no vocabulary_map, so the image tokens are unknown")
    return {str(k): int(v) for k, v in vocab.items()}


class _Setup:
    """Token roles, the image grids and the modality machine for one model and set of options."""

    def __init__(self, model, *, layout: str, images: str, image_size, stop_token_ids):
        it = model.image_tokenizer
        vocab = model_vocab(model)
        self.image_vocab = ImageVocab(vocab, num_embeddings=it.vqgan.config.num_embeddings, source=model.source)
        bos = model.tokenizer.bos_id if model.tokenizer is not None else None
        bos = model.config.bos_token_id if bos is None else bos
        self.roles = TokenRoles.from_vocab(vocab, model.config.vocab_size, self.image_vocab, bos)
        self.lumina = layout == "lumina"
        self.prompt_grid = it.grid  # images in the prompt are tokenized at the tokenizer's size
        if image_size is None:
            grid = None if self.lumina else it.grid
        else:
            if (not isinstance(image_size, (tuple, list)) or len(image_size) != 2
                    or not all(isinstance(v, int) and v > 0 for v in image_size)):
                raise FuselmError(f"image_size must be (height, width) in pixels, got {image_size!r}")
            grid = it.vqgan.grid(*image_size)
        stops = default_stop_ids(model) if stop_token_ids is None else [int(s) for s in stop_token_ids]
        if stop_token_ids is None:  # end-of-turn ends a Chameleon chat turn and is Lumina-mGPT's eos
            stops = sorted(set(stops) | {self.image_vocab.eot_id})
        self.stop_ids = stops
        area = (it.grid[0] // LATENT_PER_GRID) * (it.grid[1] // LATENT_PER_GRID)
        self.machine = ModalityMachine(self.roles, images=images, lumina=self.lumina, grid=grid,
                                       max_area=max(area, 1), stop_ids=stops)

    def image_tokens(self, model, image) -> list[int]:
        codes = model.image_tokenizer.encode([image])[0]
        ids = self.image_vocab.codes_to_ids(codes).tolist()
        return ImageLayout(*self.prompt_grid, self.lumina).sequence(ids, self.roles)


def _encode(model, prompt, setup: _Setup) -> tuple[list[int], tuple[str, ...]]:
    bos = setup.roles.bos
    if isinstance(prompt, torch.Tensor) or (isinstance(prompt, (list, tuple)) and prompt
                                            and all(isinstance(t, int) for t in prompt)):
        ids, stops = encode_prompt(model, prompt)
    elif isinstance(prompt, str) or is_chat(prompt):
        ids, stops = encode_prompt(model, prompt)
        ids = ids if bos is None or ids[:1] == [bos] else [bos, *ids]
    elif isinstance(prompt, (list, tuple)) and prompt:
        ids, stops = ([] if bos is None else [bos]), ()
        for i, part in enumerate(prompt):
            if isinstance(part, str):
                if model.tokenizer is None:
                    raise FuselmError(f"{model.source}: the model has no tokenizer, so prompt text cannot be encoded")
                ids += model.tokenizer.encode(part, add_special_tokens=False)
            elif isinstance(part, Image.Image):
                ids += setup.image_tokens(model, part)
            else:
                raise FuselmError(f"prompt part {i} is {type(part).__name__}; expected a string or a PIL image")
    else:
        raise FuselmError("prompt must be a string, chat messages, token ids, or a list of strings and PIL images")
    if not ids:
        raise FuselmError("the prompt is empty")
    bad = [t for t in ids if not 0 <= t < model.config.vocab_size]
    if bad:
        raise FuselmError(f"prompt token ids must be in [0, {model.config.vocab_size}), got {bad[:4]}")
    return list(ids), stops


def _capacity(model, ids: list[int], max_tokens: int, setup: _Setup) -> int:
    limit = model.config.max_position_embeddings
    context = max(limit, len(ids) + 1) if model.config.rope_scaling else limit
    m = setup.machine
    if setup.machine.images == "only":
        left = m.image_length(largest=True) + 1 - (m.body + len(m.sizes))  # the rest of the image and eoss
        if len(ids) + left > context:
            raise FuselmError(f"the prompt ({len(ids)} tokens) and an image ({left} tokens) do not fit the "
                              f"model's context of {context} tokens")
        return len(ids) + left
    if len(ids) >= context:
        raise FuselmError(f"prompt of {len(ids)} tokens does not fit the model's context of {context} tokens")
    return min(context, len(ids) + max_tokens)


class MixedRun(SequenceRun):
    """One mixed-modal sequence: its own cache row, plus guidance rows from each begin-of-image to its end."""

    def __init__(self, model, setup: _Setup, ids: list[int], *, capacity: int,
                 guidance: ClassifierFreeGuidance | None, processors, seed, text_params, image_params, stop,
                 progress_every: int, max_tokens: int):
        self.model, self.setup, self.ids = model, setup, ids
        self.tr = model.transformer
        self.capacity, self.guidance = capacity, guidance
        self.machine = setup.machine
        self.processors = ([guidance] if guidance else []) + [self.machine, *processors]
        self.generator = generator_for(seed)
        self.text_params, self.image_params = text_params, image_params
        self.stop, self.progress_every = stop, progress_every
        self.budget = capacity - len(ids) if setup.machine.images == "only" else max_tokens
        self.image_index = 0
        self.timings = {"prefill_s": 0.0, "text_s": 0.0, "image_s": 0.0, "vqgan_s": 0.0, "cfg_prefill_s": 0.0}
        self.counts = {"text": 0, "image": 0}

    def _new_text_stream(self) -> TextStream:
        decode = self.model.tokenizer.decode if self.model.tokenizer is not None else (lambda t: "")
        return TextStream(decode, self.stop)

    @property
    def rows_needed(self) -> int:
        return 1 + (len(self.guidance.contexts([])) if self.guidance is not None else 0)

    def join(self, decoder: Decoder) -> list[Event]:
        self.state = new_state(self.ids, self.capacity, self.tr.device)
        self.state.rows = [decoder.take_row(self.ids)]
        self.seq = list(self.ids)  # every token of the sequence
        self.text = self._new_text_stream()
        self.t_start = self.t_step = time.perf_counter()
        self.first, self.guiding = True, False
        return list(self._image_start(self.machine)) if self.machine.in_image else []

    def before_feed(self, decoder: Decoder) -> None:
        self.t_step = time.perf_counter()
        state, m = self.state, self.machine
        self.guiding = self.guidance is not None and m.in_image and len(state.rows) == 1
        if self.guiding:  # guidance rows join at begin-of-image: their contexts, then the image so far
            start = max(i for i, t in enumerate(self.seq) if t == self.setup.roles.boi)
            for context in self.guidance.contexts(self.seq[:start]):
                state.rows.append(decoder.take_row(list(context) + self.seq[start:]))

    def after_feed(self, fed: dict[int, torch.Tensor], decoder: Decoder) -> list[Event]:
        state, m, events = self.state, self.machine, []
        logits = torch.stack([fed[row] for row in state.rows])
        t0 = self.t_step
        if self.guiding:
            self.timings["cfg_prefill_s"] += time.perf_counter() - t0
        if self.first:
            self.timings["prefill_s"] = time.perf_counter() - t0
            self.first, t0 = False, time.perf_counter()
        modality = "image" if m.in_image else "text"
        params = self.image_params if m.in_image else self.text_params
        with torch.inference_mode():
            token = next_token(state, logits, self.processors, params, self.generator, decoder.model.agree)
        self.seq.append(token)
        self.timings[f"{modality}_s"] += time.perf_counter() - t0
        self.counts[modality] += 1
        (kind,) = m.sync(state.generated)
        reason = None
        if kind == "text":
            if token in self.setup.stop_ids:
                reason = "eos"
            else:
                delta = self.text.push([token])
                if delta:
                    events.append(TextDelta(delta))
                if self.text.stopped:
                    reason = "stop"
        elif kind == "begin":
            tail = self.text.flush()
            if tail:
                events.append(TextDelta(tail))
            self.text = self._new_text_stream()
            events.extend(self._image_start(m))
        elif kind == "size":
            events.extend(self._image_start(m))
        elif kind == "row":
            events.append(self._progress(m))
        elif kind == "end":
            events.append(self._image_done(self.seq))
            decoder.release(state.rows[1:])  # guidance ends with the image
            state.rows = state.rows[:1]
            if m.images == "only":
                reason = "eos"
        if reason is None:
            if len(state.generated) >= self.budget:
                reason = "length"
            elif state.position >= self.capacity:
                reason = "context"
            else:
                decoder.push(state.rows, [token])
        if reason is not None:
            state.finish_reason = reason
            tail = "" if reason == "stop" else self.text.flush()
            if tail:
                events.append(TextDelta(tail))
            events.append(Done(reason, prompt_tokens=len(self.ids), generated_tokens=len(state.generated),
                               timings=self._timings(time.perf_counter() - self.t_start)))
        return events

    # ---- events -----------------------------------------------------------------------------------------

    def _image_start(self, m: ModalityMachine) -> Iterator[Event]:
        """ImageStart once the image's size is known (at boi, or after Lumina's size tokens)."""
        if m.header_done:
            yield ImageStart(m.layout.rows, m.layout.cols, index=self.image_index)

    def _progress(self, m: ModalityMachine) -> ImageProgress:
        done, total = m.rows_done, m.layout.rows
        partial = None
        if self.progress_every and done % self.progress_every == 0 and done < total:
            partial = self._decode(m.pixels[:done * m.layout.cols], done, m.layout.cols, total)
        return ImageProgress(done, total, partial)

    def _image_done(self, seq: list[int]) -> ImageDone:
        m = self.machine  # already back in text mode: read the finished image from the sequence
        boi = max(i for i, t in enumerate(seq) if t == self.setup.roles.boi)
        body = seq[boi + 1:-1]
        if self.setup.lumina:
            rows, cols = _lumina_grid(body, self.setup.roles)
            pixels = [t for t in body[2:] if t != self.setup.roles.newline]
        else:
            rows, cols = m.grid
            pixels = body
        codes = self.setup.image_vocab.ids_to_codes(torch.tensor(pixels, dtype=torch.long))
        image = self._decode(pixels, rows, cols, rows)
        done = ImageDone(image, codes, index=self.image_index)
        self.image_index += 1
        return done

    def _decode(self, pixels: list[int], rows: int, cols: int, total_rows: int) -> Image.Image | None:
        """Picture of the first `rows` rows, on a blank canvas of `total_rows` rows; None without a decoder."""
        it = self.model.image_tokenizer
        if not it.can_decode:
            return None
        t0 = time.perf_counter()
        codes = self.setup.image_vocab.ids_to_codes(torch.tensor([pixels], dtype=torch.long))
        picture = it.processor.postprocess(it.vqgan.decode(codes, rows, cols))[0]
        if rows != total_rows:
            canvas = Image.new("RGB", (picture.width, picture.height * total_rows // rows), PARTIAL_BACKGROUND)
            canvas.paste(picture, (0, 0))
            picture = canvas
        self.timings["vqgan_s"] += time.perf_counter() - t0
        return picture

    def _timings(self, total: float) -> dict:
        t = dict(self.timings, total_s=total, text_tokens=self.counts["text"], image_tokens=self.counts["image"])
        if self.timings["prefill_s"]:
            t["prefill_tok_s"] = len(self.ids) / self.timings["prefill_s"]
        t["decode_s"] = self.timings["text_s"] + self.timings["image_s"]
        n = self.counts["text"] + self.counts["image"]
        if n > 1 and t["decode_s"]:
            t["decode_tok_s"] = n / t["decode_s"]
        for name in ("text", "image"):
            if self.counts[name] and self.timings[f"{name}_s"]:
                t[f"{name}_tok_s"] = self.counts[name] / self.timings[f"{name}_s"]
        return t


def _lumina_grid(body: list[int], roles: TokenRoles) -> tuple[int, int]:
    sizes = {i: n for n, i in roles.size_ids.items()}
    return sizes[body[0]] * LATENT_PER_GRID, sizes[body[1]] * LATENT_PER_GRID
