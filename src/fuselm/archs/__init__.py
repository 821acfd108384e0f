"""The only package that names architectures: llama, chameleon, falcon.

Internal tensor names (what model/transformer.py's modules are called):

    embed.weight, norm.{weight,bias}, lm_head.weight
    layers.{i}.attn_norm.{weight,bias}   norm before attention (Falcon-40B: ln_attn)
    layers.{i}.mlp_norm.{weight,bias}    norm before the MLP (after it for swin_norm; Falcon-40B: ln_mlp)
    layers.{i}.attn.{q,k,v,o}.{weight,bias}
    layers.{i}.attn.{q_norm,k_norm}.{weight,bias}   shape (heads or groups, head_dim)
    layers.{i}.mlp.{gate,up,down}.{weight,bias}     gate only for SwiGLU

hf.py and gguf.py hold the name tables and config parsing for each file format; meta.py (Chameleon's original
release) lives beside them. Every fix-up is a pure function from one state dict (name -> tensor) to another.
"""

from .gguf import (
    GGUF_PERMUTES_QK,
    config_from_gguf,
    config_to_gguf_metadata,
    gguf_module_names,
    gguf_tensor_name,
    gguf_to_internal,
    internal_to_gguf,
    permute_for_interleaved_rope,
    unpermute_from_interleaved_rope,
)
from .hf import (
    HF_MODEL_TYPES,
    SUPPORTED_ARCHS,
    config_from_hf,
    config_to_hf,
    hf_module_names,
    hf_tensor_name,
    hf_to_internal,
    internal_to_hf,
)
from .tensors import expected_shapes, is_norm_weight

__all__ = [
    "config_from_gguf", "config_to_gguf_metadata",
    "GGUF_PERMUTES_QK", "HF_MODEL_TYPES", "SUPPORTED_ARCHS", "config_from_hf", "config_to_hf", "expected_shapes",
    "gguf_module_names", "gguf_tensor_name", "gguf_to_internal", "hf_module_names", "hf_tensor_name", "hf_to_internal",
    "internal_to_gguf", "internal_to_hf",
    "is_norm_weight", "permute_for_interleaved_rope", "unpermute_from_interleaved_rope",
]
