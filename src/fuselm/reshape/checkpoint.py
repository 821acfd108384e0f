"""Checkpoint transforms from files to files: FlashNorm folding, qk-norm regrouping, Meta -> HF conversion.

Each public function reads a model source, transforms its state dict with a pure function from transforms/, and
writes an HF directory or a GGUF (plus Chameleon's image-tokenizer companion).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import archs
from ..config import ModelConfig
from ..errors import FuselmError
from ..formats import hf as hf_format
from ..load import ModelSource, read_source


def write_model(out: Path, fmt: str, config: ModelConfig, state: dict[str, torch.Tensor], source: ModelSource,
                *, extra_files: dict[str, str] | None = None) -> Path:
    """Write an internal state dict as an HF directory or a GGUF (plus the Chameleon image tokenizer)."""
    out = Path(out)
    if fmt == "gguf":
        if out.suffix != ".gguf":
            raise FuselmError(f"{out}: --format gguf needs an output path ending in .gguf")
        gguf_types = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
        tensors = {n: (t, "F32" if t.ndim < 2 else gguf_types.get(t.dtype, "F32"))
                   for n, t in archs.internal_to_gguf(config, state).items()}
        archs.write_gguf(out, config, tensors, tokenizer=source.tokenizer, chat_template=source.chat_template,
                         vqgan=source.vqgan)
        return out
    if out.suffix == ".gguf":
        raise FuselmError(f"{out}: looks like a GGUF path; pass --format gguf, or give a directory for HF output")
    tensors = archs.internal_to_hf(config, state)
    cfg = archs.config_to_hf(config)
    if source.vqgan is not None:
        vq_config, vq_state = source.vqgan
        tensors.update({f"model.vqmodel.{k}": v for k, v in vq_state.items()})
        cfg["vq_config"] = vq_config
    copy_from = source.path if source.kind == "hf" else None
    extra_files = dict(extra_files or {})
    if source.kind == "gguf":
        if source.path.with_name("tokenizer.json").is_file():  # the exact HF tokenizer travels beside the GGUF
            copy_from = source.path.parent
        elif source.tokenizer:
            extra_files = {**_tokenizer_files_from_gguf(source), **extra_files}
    hf_format.write_hf_dir(out, cfg, tensors, copy_tokenizer_from=copy_from)
    for name, text in extra_files.items():
        (out / name).write_text(text, encoding="utf-8")
    return out


def _tokenizer_files_from_gguf(source: ModelSource) -> dict[str, str]:
    """tokenizer.json and tokenizer_config.json rebuilt from a GGUF's tokenizer.ggml.* metadata."""
    from ..formats.gguf_vocab import tokenizer_config_from_gguf, tokenizer_from_gguf

    backend = tokenizer_from_gguf(source.tokenizer, source=str(source.path))
    return {"tokenizer.json": backend.to_str(),
            "tokenizer_config.json": json.dumps(tokenizer_config_from_gguf(source.tokenizer, source=str(source.path)),
                                                indent=2)}


def output_format(out: str | Path, fmt: str | None = None) -> str:
    """The format to write: `fmt` when given, else gguf for a path ending in .gguf and hf otherwise."""
    return fmt or ("gguf" if str(out).endswith(".gguf") else "hf")


def flashify_model(src: str | Path, out: str | Path, *, strict: bool = False, fmt: str | None = None
                   ) -> tuple[Path, list[str]]:
    """Fold norm weights into the following linears (FlashNorm). Returns the written path and the fold report."""
    from ..transforms.flashnorm import flashify

    source = read_source(src)
    config, state, report = flashify(source.config, source.state, strict=strict)
    return write_model(Path(out), output_format(out, fmt), config, state, source), list(report)


def regroup_model(src: str | Path, out: str | Path, groups: int | str, *, average: bool = False,
                  fmt: str | None = None) -> tuple[Path, float | None]:
    """Rewrite Chameleon qk-norm weights per head ("per-head") or in `groups` groups. With average=True heads
    within a group are averaged; the maximum deviation averaged away is returned (None otherwise)."""
    from ..transforms.qknorm import expand_qknorm, qknorm_max_deviation, regroup_qknorm

    source = read_source(src)
    if not source.config.qk_norm:
        raise FuselmError(f"{src}: this {source.config.arch} model has no qk-norm to regroup")
    deviation = None
    if groups == "per-head":
        state = expand_qknorm(source.config, source.state)
    else:
        try:
            groups = int(groups)
        except ValueError:
            raise FuselmError(f"--groups must be a positive integer or 'per-head', got {groups!r}") from None
        if average:
            deviation = qknorm_max_deviation(source.config, source.state, groups)
        state = regroup_qknorm(source.config, source.state, groups, average=average)
    return write_model(Path(out), output_format(out, fmt), source.config, state, source), deviation


def convert_model(meta_dir: str | Path, out: str | Path, *, qk_norm: str = "per-head", fmt: str | None = None
                  ) -> tuple[Path, list[str]]:
    """Meta's original Chameleon release -> an HF directory (or GGUF). Returns the path and the report."""
    from tokenizers import Tokenizer as HFTokenizer

    from ..load.meta import convert_meta

    conv = convert_meta(meta_dir, qk_norm=qk_norm)
    tokenizer = HFTokenizer.from_str(json.dumps(conv.tokenizer_json)) if conv.tokenizer_json else None
    vq = (conv.config.extra.get("vq_config") or {}, conv.vqgan_state_dict) if conv.vqgan_state_dict else None
    source = ModelSource(Path(meta_dir), "meta", conv.config, conv.state_dict, tokenizer, vqgan=vq)
    extra = {}
    if conv.tokenizer_json:
        extra["tokenizer.json"] = json.dumps(conv.tokenizer_json)
        extra["tokenizer_config.json"] = json.dumps(conv.tokenizer_config or {})
    path = write_model(Path(out), output_format(out, fmt), conv.config, conv.state_dict, source, extra_files=extra)
    return path, list(conv.report)
