"""Library functions that write models: quantize, flashify, regroup qk-norm, convert Meta checkpoints."""

from .checkpoint import convert_model, flashify_model, regroup_model, write_model
from .quantize import quantize_model

__all__ = ["convert_model", "flashify_model", "quantize_model", "regroup_model", "write_model"]
