"""fuselm: early-fusion transformers (Chameleon, Llama, Falcon) on an ordinary CPU.

Public API: load(), generate(), and the quants package (quantize / dequantize).
"""

from .errors import FuselmError
from .generation.generate import generate
from .load import Model, load

__all__ = ["FuselmError", "Model", "generate", "load"]
__version__ = "0.1.0"
