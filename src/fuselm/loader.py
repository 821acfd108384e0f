"""fuselm.load(): find out what a path holds, read it through formats/, fix names through archs/, build the model."""

from __future__ import annotations

from pathlib import Path

import torch

from . import archs
from .config import ModelConfig
from .errors import FuselmError
from .formats import hf as hf_format
from .model.build import build_transformer, check_state_dict, parse_dtype
from .model.rope import normalize_rope_scaling
from .model.transformer import Transformer
from .tokenizer import Tokenizer

DEMO_DIR = Path(__file__).parent / "demo" / "weights"


class Model:
    """A loaded model: `.config`, `.tokenizer`, `.image_tokenizer` (or None), and `model(tokens) -> logits`."""

    def __init__(self, transformer: Transformer, tokenizer: Tokenizer | None, *, image_tokenizer=None,
                 source: str = "", file_type: str = ""):
        self.transformer = transformer
        self.tokenizer = tokenizer
        self.image_tokenizer = image_tokenizer
        self.source = source
        self.file_type = file_type  # e.g. "hf safetensors", "gguf Q4_K_M"

    @property
    def config(self) -> ModelConfig:
        return self.transformer.config

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Full causal forward without cache: LongTensor [B, T] -> float32 logits [B, T, vocab]. Raw logits."""
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.long, torch.int32) or tokens.ndim != 2:
            raise FuselmError("model(tokens) expects an integer tensor of shape [batch, tokens]")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.config.vocab_size):
            raise FuselmError(f"token ids must be in [0, {self.config.vocab_size}), got {int(tokens.min())}.."
                              f"{int(tokens.max())}")
        if tokens.shape[1] > self.config.max_position_embeddings and not self.config.rope_scaling:
            raise FuselmError(f"sequence of {tokens.shape[1]} tokens is longer than the model's context of "
                              f"{self.config.max_position_embeddings}")
        with torch.inference_mode():
            return self.transformer(tokens.long())

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.transformer.parameters())


def _with_rope_override(config: ModelConfig, rope_scaling: dict | None) -> ModelConfig:
    if rope_scaling is None:
        return config
    scaling = normalize_rope_scaling(rope_scaling, source="rope_scaling argument")
    return config.replace(rope_scaling=scaling)


def load_hf(directory: Path, *, dtype=None, device="cpu", rope_scaling: dict | None = None) -> Model:
    directory = Path(directory)
    cfg = hf_format.read_config(directory)
    config = _with_rope_override(archs.config_from_hf(cfg, source=str(directory / "config.json")), rope_scaling)
    raw = hf_format.read_weights(directory)
    vision_state = {k[len("model.vqmodel."):]: v for k, v in raw.items() if k.startswith("model.vqmodel.")}
    state = archs.hf_to_internal(config, raw, source=str(directory))
    state = check_state_dict(config, state, str(directory), lambda n: archs.hf_tensor_name(config, n))
    target = parse_dtype(dtype) or _default_dtype(state)
    transformer = build_transformer(config, state, dtype=target, device=device)
    image_tokenizer = _hf_image_tokenizer(cfg, vision_state, directory) if config.arch == "chameleon" else None
    tokenizer = Tokenizer.from_dir(directory)
    return Model(transformer, tokenizer, image_tokenizer=image_tokenizer, source=str(directory),
                 file_type="hf")


def _default_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    """Keep the checkpoint's float dtype (so weights stay memory-mapped), float32 if mixed."""
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _hf_image_tokenizer(cfg: dict, vision_state: dict, directory: Path):
    if not vision_state:
        return None
    from .vision import ImageTokenizer, vqgan_from_hf_state_dict

    return ImageTokenizer(vqgan_from_hf_state_dict(cfg.get("vq_config") or {}, vision_state))


def load_meta(directory: Path, *, dtype=None, device="cpu", rope_scaling: dict | None = None) -> Model:
    """Meta's original Chameleon release, converted in memory (shards merged, q/k permuted)."""
    import json

    from tokenizers import Tokenizer as HFTokenizer

    from .transforms.meta_convert import convert_meta

    conv = convert_meta(directory)
    config = _with_rope_override(conv.config, rope_scaling)
    state = check_state_dict(config, conv.state_dict, str(directory))
    target = parse_dtype(dtype) or _default_dtype(state)
    transformer = build_transformer(config, state, dtype=target, device=device)
    tokenizer = None
    if conv.tokenizer_json:
        cfg = conv.tokenizer_config or {}
        tokenizer = Tokenizer(HFTokenizer.from_str(json.dumps(conv.tokenizer_json)), bos_token=cfg.get("bos_token"),
                              eos_token=cfg.get("eos_token"), add_bos=cfg.get("add_bos_token"), source=str(directory))
    image_tokenizer = None
    if conv.vqgan_state_dict:
        vision_state = {k[len("model.vqmodel."):]: v for k, v in conv.vqgan_state_dict.items()}
        from .vision import ImageTokenizer, VQGANConfig, vqgan_from_state_dict

        vq_config = VQGANConfig.from_dict(config.extra.get("vq_config") or {}, source=str(directory))
        image_tokenizer = ImageTokenizer(vqgan_from_state_dict(vq_config, vision_state, source=str(directory)))
    return Model(transformer, tokenizer, image_tokenizer=image_tokenizer, source=str(directory), file_type="meta")


def resolve_model_path(path: str | Path | None) -> Path:
    """What a model argument names: "demo" (or None) is the bundled model; a folder holding exactly one model
    .gguf (besides its -vqgan companion) and no config.json is that file. Errors name the path."""
    if path is None or str(path) == "demo":
        path = DEMO_DIR
    path = Path(path)
    if not path.exists():
        raise FuselmError(f"{path}: no such file or directory")
    if path.is_dir() and any(path.glob("*.gguf")) and not (path / "config.json").exists():
        ggufs = sorted(p for p in path.glob("*.gguf") if not p.name.endswith("-vqgan.gguf"))
        if len(ggufs) != 1:
            raise FuselmError(f"{path}: expected exactly one model .gguf file, found {[p.name for p in ggufs]}")
        path = ggufs[0]
    return path


def load(path: str | Path | None = None, *, dtype=None, device: str = "cpu",
         rope_scaling: dict | None = None) -> Model:
    """Load an HF directory, a .gguf file, a Meta Chameleon checkpoint directory, or "demo" (the bundled model)."""
    path = resolve_model_path(path)
    if path.is_file() and path.suffix == ".gguf":
        from .loader_gguf import load_gguf

        return load_gguf(path, dtype=dtype, device=device, rope_scaling=rope_scaling)
    if hf_format.is_hf_dir(path):
        return load_hf(path, dtype=dtype, device=device, rope_scaling=rope_scaling)
    if path.is_dir() and (path / "params.json").is_file():
        return load_meta(path, dtype=dtype, device=device, rope_scaling=rope_scaling)
    raise FuselmError(f"{path}: not a model: expected an HF directory (config.json), a .gguf file, or a Meta "
                      f"checkpoint directory (params.json + consolidated*.pth)")
