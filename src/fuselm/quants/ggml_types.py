"""The GGML tensor types fuselm reads and writes: id, block size and bytes per block.

Sizes follow ggml-common.h (the C structs), not gguf-py's GGML_QUANT_SIZES, which is wrong for Q8_1.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGMLQuantizationType

from fuselm.errors import FuselmError

QK_K = 256  # elements in a K-quant super-block


@dataclass(frozen=True)
class GGMLType:
    name: str
    type_id: GGMLQuantizationType
    block_size: int  # elements per block
    type_size: int  # bytes per block
    half_fields: tuple[int, ...] = ()  # byte offsets of the fp16 (bf16 for BF16) values in a block


# name, block size, bytes per block, offsets of the half-precision fields (the ggml-common.h structs)
_TABLE: tuple[tuple[str, int, int, tuple[int, ...]], ...] = (
    ("F32", 1, 4, ()),
    ("F16", 1, 2, (0,)),
    ("BF16", 1, 2, (0,)),
    ("Q4_0", 32, 2 + 16, (0,)),
    ("Q4_1", 32, 2 + 2 + 16, (0, 2)),
    ("Q5_0", 32, 2 + 4 + 16, (0,)),
    ("Q5_1", 32, 2 + 2 + 4 + 16, (0, 2)),
    ("Q8_0", 32, 2 + 32, (0,)),
    ("Q2_K", QK_K, 16 + 64 + 2 + 2, (80, 82)),
    ("Q3_K", QK_K, 32 + 64 + 12 + 2, (108,)),
    ("Q4_K", QK_K, 2 + 2 + 12 + 128, (0, 2)),
    ("Q5_K", QK_K, 2 + 2 + 12 + 32 + 128, (0, 2)),
    ("Q6_K", QK_K, 128 + 64 + 16 + 2, (208,)),
    ("IQ4_NL", 32, 2 + 16, (0,)),
    ("IQ4_XS", QK_K, 2 + 2 + 4 + 128, (0,)),
    ("TQ1_0", QK_K, 48 + 4 + 2, (52,)),
    ("TQ2_0", QK_K, 64 + 2, (64,)),
    ("MXFP4", 32, 1 + 16, ()),
    ("IQ1_S", QK_K, 2 + 32 + 16, (0,)),
    ("IQ1_M", QK_K, 32 + 16 + 8, ()),  # its fp16 scale is spread over four nibbles
    ("IQ2_XXS", QK_K, 2 + 64, (0,)),
    ("IQ2_XS", QK_K, 2 + 64 + 8, (0,)),
    ("IQ2_S", QK_K, 2 + 64 + 8 + 8, (0,)),
    ("IQ3_XXS", QK_K, 2 + 64 + 32, (0,)),
    ("IQ3_S", QK_K, 2 + 64 + 8 + 32 + 4, (0,)),
)

GGML_TYPES: dict[str, GGMLType] = {
    name: GGMLType(name, GGMLQuantizationType[name], block, size, halves)
    for name, block, size, halves in _TABLE
}


def ggml_type(type: str | GGMLQuantizationType) -> GGMLType:
    """Look a type up by its GGML name ("Q4_K", case-insensitive) or its gguf enum member."""
    key = type.name if isinstance(type, GGMLQuantizationType) else str(type).upper()
    try:
        return GGML_TYPES[key]
    except KeyError:
        known = ", ".join(GGML_TYPES)
        raise FuselmError(f"unsupported GGML type {type!r}: expected one of {known}") from None


def row_bytes(type: str | GGMLQuantizationType, cols: int) -> int:
    """Bytes in one row of `cols` elements (ggml_row_size); cols must be a whole number of blocks."""
    t = ggml_type(type)
    if cols % t.block_size:
        raise FuselmError(f"{t.name}: row length {cols} is not a multiple of the block size {t.block_size}")
    return cols // t.block_size * t.type_size
