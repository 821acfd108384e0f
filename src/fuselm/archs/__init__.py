"""Architectures as data: one Arch record per family (llama, chameleon, falcon, qwen2, mistral) in its own file,
and the generic machinery that reads and writes HF, GGUF and Meta checkpoints through those records.

Internal tensor names are listed in fuselm.config.tensors. Every fix-up is a pure function from one state dict
(name -> tensor) to another. Adding an architecture: a new file building an Arch, and its line in registry.py.
"""

from .gguf import (
    gguf_module_names,
    gguf_tensor_name,
    gguf_to_internal,
    internal_to_gguf,
    permute_for_interleaved_rope,
    unpermute_from_interleaved_rope,
)
from .gguf_config import config_from_gguf, config_to_gguf_metadata, gguf_extra_tensors
from .gguf_io import write_gguf
from .hf import config_from_hf, config_to_hf, hf_module_names, hf_tensor_name, hf_to_internal, internal_to_hf
from .record import Arch
from .registry import ARCHS, HF_MODEL_TYPES, SUPPORTED_ARCHS, arch_record

__all__ = [
    "ARCHS", "Arch", "HF_MODEL_TYPES", "SUPPORTED_ARCHS", "arch_record", "config_from_gguf", "config_from_hf",
    "config_to_gguf_metadata", "config_to_hf", "gguf_extra_tensors", "gguf_module_names", "gguf_tensor_name",
    "gguf_to_internal", "hf_module_names", "hf_tensor_name", "hf_to_internal", "internal_to_gguf", "internal_to_hf",
    "permute_for_interleaved_rope", "unpermute_from_interleaved_rope", "write_gguf",
]
