"""What a model is, as data: ModelConfig (every architectural switch), RopeSpec, and the tensor inventory.

config imports no model, format or architecture code; everything above it may use it.
"""

from .model import BLOCK_KINDS, MLP_KINDS, NORM_KINDS, ModelConfig
from .rope import ROPE_TYPES, RopeSpec, normalize_rope_scaling
from .tensors import expected_shapes, is_norm_weight

__all__ = ["BLOCK_KINDS", "MLP_KINDS", "NORM_KINDS", "ROPE_TYPES", "ModelConfig", "RopeSpec", "expected_shapes",
           "is_norm_weight", "normalize_rope_scaling"]
