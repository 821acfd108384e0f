"""Image-token ids in the BPE vocab <-> VQGAN codebook indices, plus the image special tokens.

Chameleon names the token for codebook index i `IMGIMG<letters>Z`, where the letters spell the decimal
digits of i with A..J = 0..9 (e.g. 53 -> `IMGIMGFDZ`). The table is built from the names, validated, and
kept as two dense tensors.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from fuselm.errors import FuselmError

IMAGE_TOKEN_PREFIX = "IMGIMG"
BEGIN_IMAGE = "<racm3:break>"
END_IMAGE = "<eoss>"
END_TURN = "<reserved08706>"

_NAME_RE = re.compile(r"IMGIMG([A-J]+)Z")
_LETTER_TO_DIGIT = str.maketrans("ABCDEFGHIJ", "0123456789")
_DIGIT_TO_LETTER = str.maketrans("0123456789", "ABCDEFGHIJ")


def image_token_name(index: int) -> str:
    """Codebook index -> vocab token name, e.g. 53 -> 'IMGIMGFDZ'."""
    if index < 0:
        raise FuselmError(f"image_token_name: codebook index must be >= 0, got {index}")
    return IMAGE_TOKEN_PREFIX + str(index).translate(_DIGIT_TO_LETTER) + "Z"


def parse_image_token_name(name: str, source: str = "vocab") -> int:
    """Vocab token name -> codebook index; raises on anything that is not `IMGIMG[A-J]+Z`."""
    m = _NAME_RE.fullmatch(name)
    if m is None:
        raise FuselmError(f"{source}: image token {name!r}: expected IMGIMG<letters A-J>Z")
    return int(m.group(1).translate(_LETTER_TO_DIGIT))


class ImageVocab:
    """Validated codebook-index <-> token-id table built from a BPE vocab (token string -> id)."""

    def __init__(self, vocab: Mapping[str, int], *, num_embeddings: int | None = None, source: str = "vocab"):
        found = {name: tid for name, tid in vocab.items() if name.startswith(IMAGE_TOKEN_PREFIX)}
        if not found:
            raise FuselmError(f"{source}: no image tokens (names starting with {IMAGE_TOKEN_PREFIX!r})")
        n = len(found)
        if num_embeddings is not None and n != num_embeddings:
            raise FuselmError(f"{source}: {n} image tokens but the VQGAN codebook has {num_embeddings} entries")
        codes = {name: parse_image_token_name(name, source) for name in found}
        by_code: dict[int, str] = {}
        for name, code in codes.items():
            if code in by_code:
                raise FuselmError(f"{source}: codebook index {code} appears twice ({by_code[code]!r} and {name!r})")
            by_code[code] = name
        missing = sorted(set(range(n)) - set(by_code))
        if missing:
            extra = sorted(c for c in by_code if c >= n)
            raise FuselmError(f"{source}: image-token codebook indices must be exactly 0..{n - 1}: missing "
                              f"{missing[:8]}, beyond the range {extra[:8]}")
        ids = [int(found[by_code[c]]) for c in range(n)]
        if min(ids) < 0 or len(set(ids)) != n:
            raise FuselmError(f"{source}: image-token ids must be distinct and non-negative")
        code_to_id = torch.tensor(ids, dtype=torch.long)
        id_to_code = torch.full((max(int(v) for v in vocab.values()) + 1,), -1, dtype=torch.long)
        id_to_code[code_to_id] = torch.arange(n)
        self.code_to_id = code_to_id
        self.id_to_code = id_to_code
        self.image_token_ids = code_to_id.sort().values
        self.boi_id = self._special(vocab, BEGIN_IMAGE, "begin-of-image", source)
        self.eoi_id = self._special(vocab, END_IMAGE, "end-of-image", source)
        self.eot_id = self._special(vocab, END_TURN, "end-of-turn", source)

    @staticmethod
    def _special(vocab: Mapping[str, int], name: str, role: str, source: str) -> int:
        if name not in vocab:
            raise FuselmError(f"{source}: {role} token {name!r} is missing")
        return int(vocab[name])

    @property
    def num_codes(self) -> int:
        return self.code_to_id.numel()

    def codes_to_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """Codebook indices (any shape) -> BPE token ids (same shape, int64)."""
        if codes.is_floating_point() or codes.is_complex():
            raise FuselmError(f"codes_to_ids: expected integer codebook indices, got {codes.dtype}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.num_codes):
            raise FuselmError(f"codes_to_ids: codebook indices must lie in [0, {self.num_codes}), got range "
                              f"[{int(codes.min())}, {int(codes.max())}]")
        return self.code_to_id.to(codes.device)[codes.long()]

    def ids_to_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """BPE token ids (any shape) -> codebook indices; every id must be an image token."""
        if ids.is_floating_point() or ids.is_complex():
            raise FuselmError(f"ids_to_codes: expected integer token ids, got {ids.dtype}")
        mask = self.is_image_token(ids)
        if not bool(mask.all()):
            bad = ids[~mask].flatten()[:4].tolist()
            raise FuselmError(f"ids_to_codes: {int((~mask).sum())} ids are not image tokens (first: {bad})")
        return self.id_to_code.to(ids.device)[ids.long()]

    def is_image_token(self, ids: torch.Tensor) -> torch.Tensor:
        """Bool mask, same shape as ids: True where the id is an image token (out-of-range ids are False)."""
        table = self.id_to_code.to(ids.device)
        ids = ids.long()
        inside = (ids >= 0) & (ids < table.numel())
        return inside & (table[ids.clamp(0, table.numel() - 1)] >= 0)
