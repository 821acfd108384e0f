"""GGML quantization codecs: quantize/dequantize tensors in ggml's block layouts, bit-exact with llama.cpp."""

from fuselm.quants.codecs import CODECS, dequantize, quantize, requires_imatrix, unpack
from fuselm.quants.ggml_types import GGML_TYPES, QK_K, GGMLType, ggml_type, row_bytes
from fuselm.quants.unpacked import Unpacked

__all__ = [
    "CODECS",
    "GGML_TYPES",
    "QK_K",
    "GGMLType",
    "Unpacked",
    "dequantize",
    "ggml_type",
    "quantize",
    "requires_imatrix",
    "row_bytes",
    "unpack",
]
