"""Loading: the one reader of model sources (HF, GGUF, Meta) and fuselm.load()."""

from .model import Model, load
from .paths import DEMO_DIR, resolve_model_path
from .source import ModelSource, read_source

__all__ = ["DEMO_DIR", "Model", "ModelSource", "load", "read_source", "resolve_model_path"]
