"""Every architecture family fuselm runs, by name, HF model_type and llama.cpp architecture."""

from __future__ import annotations

from ..errors import FuselmError
from .chameleon import CHAMELEON
from .falcon import FALCON
from .llama import LLAMA
from .mistral import MISTRAL
from .qwen2 import QWEN2
from .record import Arch

ARCHS: dict[str, Arch] = {a.name: a for a in (LLAMA, CHAMELEON, FALCON, QWEN2, MISTRAL)}
HF_MODEL_TYPES: dict[str, str] = {t: a.name for a in ARCHS.values() for t in a.hf_model_types}
# A llama.cpp architecture reads as the family of the same name; others sharing it (mistral -> llama) say so in
# the file's fuselm.architecture key.
GGUF_ARCHS: dict[str, str] = {a.gguf_arch: a.name for a in ARCHS.values() if a.gguf_arch == a.name}
SUPPORTED_ARCHS = tuple(ARCHS)


def arch_record(name: str) -> Arch:
    record = ARCHS.get(name)
    if record is None:
        raise FuselmError(f"unknown architecture {name!r}; expected one of {', '.join(ARCHS)}")
    return record
