"""Logits processors for mixed-modal decoding: the modality state machine and classifier-free guidance.

Both follow the loop's contract `(state, logits[B, V]) -> logits[B or 1, V]`, so they also plug into
`fuselm.generation.decoder`. The machine reads the tokens sampled so far from `state.generated` (it never needs to be
told),
so it can be asked about the current mode at any time.

Two image layouts (all special tokens are looked up by name, never by id):
- chameleon (Meta, Anole): `boi, h*w image tokens, eoss`; the grid is fixed (32x32 for 512 px).
- lumina (Lumina-mGPT): `boi, <size h>, <size w>, h rows of (w image tokens, <reserved08799>), eoss`, where the
  size tokens are `<reserved{8800+n}>` counting grids of 2x2 latent cells. Row ends and eoss are forced by position;
  the size tokens are forced when the caller fixes the size, otherwise the model picks them among the sizes that fit.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..errors import FuselmError
from ..vision.vocab import ImageVocab
from .decoder import SequenceState

TEXT, IMAGE = "text", "image"
IMAGES_MODES = ("off", "on", "only")
LUMINA_NEWLINE = "<reserved08799>"
LATENT_PER_GRID = 2  # Lumina's 32 px patch is 2x2 cells of the 16x VQGAN
LUMINA_MAX_RATIO = 4.0  # Lumina's crop list keeps aspect ratios up to 4
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def lumina_size_token(grids: int) -> str:
    return f"<reserved{8800 + grids:05d}>"


def is_special_name(name: str) -> bool:
    """Meta's rule: names in angle brackets are control tokens (byte-fallback tokens like <0x0A> are text)."""
    return len(name) > 2 and name[0] == "<" and name[-1] == ">" and not _BYTE_TOKEN.fullmatch(name)


@dataclass(frozen=True)
class TokenRoles:
    """Which ids play which part, from the vocabulary names."""

    vocab_size: int
    boi: int
    eoi: int
    bos: int | None
    image_ids: torch.Tensor  # codebook order (index i is the token of code i)
    text_ids: torch.Tensor  # ordinary text tokens: not image tokens, not control tokens
    newline: int | None  # Lumina row end
    size_ids: Mapping[int, int]  # Lumina: grids -> token id

    @classmethod
    def from_vocab(cls, vocab: Mapping[str, int], vocab_size: int, image_vocab: ImageVocab,
                   bos: int | None) -> TokenRoles:
        image = set(image_vocab.code_to_id.tolist())
        text = sorted(i for name, i in vocab.items()
                      if i < vocab_size and i not in image and not is_special_name(name))
        sizes = {}
        n = 1
        while lumina_size_token(n) in vocab:
            sizes[n] = int(vocab[lumina_size_token(n)])
            n += 1
        return cls(vocab_size=vocab_size, boi=image_vocab.boi_id, eoi=image_vocab.eoi_id, bos=bos,
                   image_ids=image_vocab.code_to_id.clone(), text_ids=torch.tensor(text, dtype=torch.long),
                   newline=vocab.get(LUMINA_NEWLINE), size_ids=sizes)

    def structure_ids(self) -> set[int]:
        """Every id that may appear inside an image besides image tokens."""
        ids = {self.boi, self.eoi, *self.size_ids.values()}
        return ids | ({self.newline} if self.newline is not None else set())


@dataclass(frozen=True)
class ImageLayout:
    """Where each token of one image goes; rows x cols is the latent grid."""

    rows: int
    cols: int
    lumina: bool

    @property
    def header(self) -> int:
        return 2 if self.lumina else 0

    @property
    def length(self) -> int:
        """Tokens between boi and eoss."""
        return self.header + self.rows * (self.cols + int(self.lumina))

    def expected(self, j: int) -> str:
        """What body position j (counted after the header) must hold: 'pixel', 'newline' or 'end'."""
        if j == self.length - self.header:
            return "end"
        if self.lumina and (j + 1) % (self.cols + 1) == 0:
            return "newline"
        return "pixel"

    def sequence(self, image_ids: Sequence[int], roles: TokenRoles) -> list[int]:
        """boi + the image's tokens in this layout + eoss (for images placed in a prompt)."""
        ids = [int(i) for i in image_ids]
        if len(ids) != self.rows * self.cols:
            raise FuselmError(f"image has {len(ids)} tokens, expected {self.rows}x{self.cols}")
        if not self.lumina:
            return [roles.boi, *ids, roles.eoi]
        out = [roles.boi, *lumina_header(self.rows, self.cols, roles)]
        for r in range(self.rows):
            out += ids[r * self.cols:(r + 1) * self.cols] + [roles.newline]
        return out + [roles.eoi]


def lumina_header(rows: int, cols: int, roles: TokenRoles) -> list[int]:
    if roles.newline is None:
        raise FuselmError(f"the Lumina layout needs the row-end token {LUMINA_NEWLINE!r} in the vocabulary")
    if rows % LATENT_PER_GRID or cols % LATENT_PER_GRID:
        raise FuselmError(f"the Lumina layout needs an even latent grid, got {rows}x{cols}")
    out = []
    for n in (rows // LATENT_PER_GRID, cols // LATENT_PER_GRID):
        if n not in roles.size_ids:
            raise FuselmError(f"the Lumina layout needs the size token {lumina_size_token(n)!r} in the vocabulary")
        out.append(roles.size_ids[n])
    return out


class ModalityMachine:
    """Text / image state from the tokens seen so far; called as a processor it masks what may come next.

    Text mode allows text tokens and `stop_ids`, plus begin-of-image when `images == "on"` and a whole image still
    fits before `state.capacity`. Image mode allows only image tokens and forces the layout's structure tokens.
    `grid` is the latent (rows, cols) of generated images; None (Lumina only) lets the model choose its size
    tokens, within `max_area` grids and an aspect ratio of 4.
    """

    def __init__(self, roles: TokenRoles, *, images: str = "on", lumina: bool = False,
                 grid: tuple[int, int] | None = None, max_area: int | None = None, stop_ids: Sequence[int] = ()):
        if images not in IMAGES_MODES:
            raise FuselmError(f"images must be one of {IMAGES_MODES}, got {images!r}")
        if grid is None and not lumina:
            raise FuselmError("the chameleon layout needs a fixed image grid")
        self.roles, self.images, self.lumina, self.grid = roles, images, lumina, grid
        if lumina and grid is not None:
            lumina_header(*grid, roles)  # fail now if the tokens are missing
        if lumina and grid is None:
            if not roles.size_ids or roles.newline is None:
                raise FuselmError("the Lumina layout needs <reserved08799> and <reserved088NN> size tokens")
            if not max_area or max_area < 1:
                raise FuselmError(f"a model-chosen Lumina size needs max_area >= 1 grids, got {max_area!r}")
        self.max_area = max_area
        V = roles.vocab_size
        self.text_mask = torch.zeros(V, dtype=torch.bool)
        self.text_mask[roles.text_ids] = True
        self.text_mask[[i for i in stop_ids if 0 <= i < V]] = True
        self.text_mask[roles.boi] = False
        self.image_mask = torch.zeros(V, dtype=torch.bool)
        self.image_mask[roles.image_ids] = True
        self.mode = TEXT
        self.seen = 0
        self._enter_text()

    # ---- state ------------------------------------------------------------------------------------------

    def _enter_text(self) -> None:
        self.mode = TEXT
        self.sizes: list[int] = []  # Lumina size tokens (in grids) read so far in this image
        self.layout: ImageLayout | None = None
        self.body = 0  # tokens after the header
        self.pixels: list[int] = []  # image-token ids of the current image

    def _enter_image(self) -> None:
        self._enter_text()
        self.mode = IMAGE
        if self.grid is not None:
            self.layout = ImageLayout(*self.grid, self.lumina)

    @property
    def in_image(self) -> bool:
        return self.mode == IMAGE

    @property
    def header_done(self) -> bool:
        return self.layout is not None and len(self.sizes) == self.layout.header

    @property
    def guided(self) -> bool:
        """Guidance applies inside an image once its size is fixed (Lumina starts after the size tokens)."""
        return self.in_image and self.header_done

    @property
    def rows_done(self) -> int:
        return len(self.pixels) // self.layout.cols if self.layout else 0

    def start(self, prompt: Sequence[int]) -> None:
        """Set the mode the prompt leaves us in: inside an image if its last boi has no eoss after it."""
        self._enter_text()
        self.seen = 0
        ids = [int(t) for t in prompt]
        last = max((i for i, t in enumerate(ids) if t == self.roles.boi), default=-1)
        if last >= 0 and self.roles.eoi not in ids[last:]:
            for t in ids[last:]:
                self.feed(t)

    def sync(self, generated: Sequence[int]) -> list[str]:
        """Feed the tokens of `generated` not seen yet; returns what each one did (see `feed`)."""
        kinds = [self.feed(int(t)) for t in generated[self.seen:]]
        self.seen = len(generated)
        return kinds

    def feed(self, token: int) -> str:
        """Advance by one token. Returns 'text', 'begin' (boi), 'size', 'pixel', 'row' (a row completed) or 'end'."""
        if self.mode == TEXT:
            if token == self.roles.boi:
                self._enter_image()
                return "begin"
            return "text"
        if self.lumina and len(self.sizes) < 2:
            n = next((g for g, i in self.roles.size_ids.items() if i == token), None)
            if n is None:
                raise FuselmError(f"token {token} after begin-of-image is not a Lumina size token")
            self.sizes.append(n)
            if len(self.sizes) == 2:
                rows, cols = self.sizes[0] * LATENT_PER_GRID, self.sizes[1] * LATENT_PER_GRID
                if self.layout is not None and (rows, cols) != (self.layout.rows, self.layout.cols):
                    raise FuselmError(f"image size tokens say {rows}x{cols}, expected "
                                      f"{self.layout.rows}x{self.layout.cols}")
                self.layout = ImageLayout(rows, cols, True)
            return "size"
        want = self.layout.expected(self.body)
        if want == "end":
            if token != self.roles.eoi:
                raise FuselmError(f"token {token} where the image must end with end-of-image {self.roles.eoi}")
            self._enter_text()
            return "end"
        self.body += 1
        if want == "newline":
            if token != self.roles.newline:
                raise FuselmError(f"token {token} where the image row must end with {LUMINA_NEWLINE}")
            return "row"
        if not bool(self.image_mask[token]):
            raise FuselmError(f"token {token} inside an image is not an image token")
        self.pixels.append(token)
        return "row" if not self.lumina and len(self.pixels) % self.layout.cols == 0 else "pixel"

    # ---- sizes ------------------------------------------------------------------------------------------

    def _min_cols(self, rows_grids: int) -> int | None:
        """Smallest width (grids) allowed with this height, or None."""
        for m in sorted(self.roles.size_ids):
            if self._size_ok(rows_grids, m):
                return m
        return None

    def _size_ok(self, n: int, m: int) -> bool:
        return n * m <= self.max_area and max(n, m) <= LUMINA_MAX_RATIO * min(n, m)

    @staticmethod
    def _lumina_body(n: int, m: int) -> int:
        return (n * LATENT_PER_GRID) * (m * LATENT_PER_GRID + 1)

    def image_length(self, largest: bool = False) -> int:
        """Tokens between boi and eoss of a fixed-size image, or the smallest (largest) a model may choose."""
        if self.grid is not None:
            return ImageLayout(*self.grid, self.lumina).length
        sizes = [2 + self._lumina_body(n, m) for n in self.roles.size_ids for m in self.roles.size_ids
                 if self._size_ok(n, m)]
        if not sizes:
            raise FuselmError(f"no Lumina image size fits max_area={self.max_area} grids")
        return max(sizes) if largest else min(sizes)

    # ---- masks ------------------------------------------------------------------------------------------

    def allowed(self, remaining: int) -> torch.Tensor | int:
        """A bool mask [V] of allowed ids, or the one forced id. `remaining`: positions left, this one included."""
        if self.mode == TEXT:
            if self.images == "on" and remaining >= self.image_length() + 2:
                mask = self.text_mask.clone()
                mask[self.roles.boi] = True
                return mask
            return self.text_mask
        if self.lumina and len(self.sizes) < 2:
            if self.layout is not None:
                return self.roles.size_ids[(self.layout.rows if not self.sizes else self.layout.cols)
                                           // LATENT_PER_GRID]
            mask = torch.zeros_like(self.text_mask)
            for n, tok in self.roles.size_ids.items():
                if not self.sizes:  # height: some width must still fit (h, w, body, eoss)
                    m = self._min_cols(n)
                    ok = m is not None and self._lumina_body(n, m) + 3 <= remaining
                else:  # width: (w, body, eoss)
                    ok = self._size_ok(self.sizes[0], n) and self._lumina_body(self.sizes[0], n) + 2 <= remaining
                mask[tok] = ok
            if not bool(mask.any()):
                raise FuselmError(f"no Lumina image size fits the {remaining} positions left")
            return mask
        want = self.layout.expected(self.body)
        if want == "end":
            return self.roles.eoi
        if want == "newline":
            return self.roles.newline
        return self.image_mask

    def __call__(self, state: SequenceState, logits: torch.Tensor) -> torch.Tensor:
        self.sync(state.generated)
        allowed = self.allowed(state.remaining)
        if isinstance(allowed, int):
            out = torch.full_like(logits, -math.inf)
            out[:, allowed] = 0.0
            return out
        return logits.masked_fill(~allowed.to(logits.device), -math.inf)


# ---- classifier-free guidance -----------------------------------------------------------------------------


def meta_guidance(full: torch.Tensor, image_cond: torch.Tensor, uncond: torch.Tensor, text_scale: float,
                  image_scale: float) -> torch.Tensor:
    """Meta's InstructPix2Pix-style 3-way guidance: u + g_img*(ic - u) + g_txt*(fc - ic)."""
    return uncond + image_scale * (image_cond - uncond) + text_scale * (full - image_cond)


def lumina_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Lumina-mGPT's 2-way guidance: u + cfg*(c - u)."""
    return uncond + scale * (cond - uncond)


GUIDANCE_KINDS = ("meta", "lumina")


class ClassifierFreeGuidance:
    """Merges the guidance rows into one while the machine says guidance applies (otherwise keeps row 0).

    Row 0 is always the full conditional context. The rows after it are what `contexts` builds at each
    begin-of-image: Meta adds the prompt with its text removed and `[bos]`; Lumina adds an empty context, so its
    unconditional row sees only the image from boi on. The caller appends boi (and what follows) to every row.
    """

    def __init__(self, machine: ModalityMachine, kind: str, *, text_scale: float = 3.0, image_scale: float = 1.2,
                 scale: float = 3.0):
        if kind not in GUIDANCE_KINDS:
            raise FuselmError(f"cfg must be one of {GUIDANCE_KINDS} or 'off', got {kind!r}")
        for name, v in (("cfg_text", text_scale), ("cfg_image", image_scale), ("cfg_scale", scale)):
            if not (isinstance(v, (int, float)) and math.isfinite(v)):
                raise FuselmError(f"{name} must be a finite number, got {v!r}")
        self.machine, self.kind = machine, kind
        self.text_scale, self.image_scale, self.scale = float(text_scale), float(image_scale), float(scale)

    @property
    def rows(self) -> int:
        return 3 if self.kind == "meta" else 2

    @property
    def is_identity(self) -> bool:
        if self.kind == "meta":
            return self.text_scale == 1.0 and self.image_scale == 1.0
        return self.scale == 1.0

    def contexts(self, context: Sequence[int]) -> list[list[int]]:
        """The guidance rows' contexts (without the image's own boi) for a full context."""
        roles = self.machine.roles
        if self.kind == "lumina":
            return [[]]
        keep = set(roles.image_ids.tolist()) | roles.structure_ids() | ({roles.bos} if roles.bos is not None else set())
        image_only = [int(t) for t in context if int(t) in keep]
        return [image_only, [roles.bos] if roles.bos is not None else []]

    def __call__(self, state: SequenceState, logits: torch.Tensor) -> torch.Tensor:
        if logits.shape[0] == 1:
            return logits
        if logits.shape[0] != self.rows:
            raise FuselmError(f"{self.kind} guidance expects {self.rows} rows of logits, got {logits.shape[0]}")
        self.machine.sync(state.generated)
        if not self.machine.guided:
            return logits[:1]
        if self.kind == "meta":
            return meta_guidance(logits[0:1], logits[1:2], logits[2:3], self.text_scale, self.image_scale)
        return lumina_guidance(logits[0:1], logits[1:2], self.scale)
