"""fuselm: early-fusion transformers (Chameleon, Llama, Falcon, Qwen2, Mistral) on an ordinary CPU.

Public API: load(), generate(), the checkpoint writers (quantize_model, flashify_model, regroup_model,
convert_model), and the quants package (quantize / dequantize).
"""

from .threads import configure_openmp

configure_openmp()  # before anything imports torch: libgomp reads its wait policy once, when it loads

from .errors import FuselmError  # noqa: E402
from .generation.generate import generate  # noqa: E402
from .load import Model, load  # noqa: E402
from .reshape import convert_model, flashify_model, quantize_model, regroup_model  # noqa: E402

__all__ = ["FuselmError", "Model", "convert_model", "flashify_model", "generate", "load", "quantize_model",
           "regroup_model"]
__version__ = "0.2.0"
