"""Reading Meta's original Chameleon release (`fuselm convert`, and `fuselm.load` of a Meta directory).

Meta's download is laid out as
    data/models/7b/{consolidated.pth, params.json, consolidate_params.json}
    data/models/30b/{consolidated.00.pth .. consolidated.03.pth, params.json, ...}
    data/tokenizer/{text_tokenizer.json, vqgan.yaml, vqgan.ckpt}
This module finds those files, reads them without running pickled code, and returns the converted config,
weights, VQGAN weights and tokenizer as data; writing the directory is formats/hf.py's job.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..archs.meta import QK_NORM_LAYOUTS, merge_meta_params, meta_to_internal
from ..config import ModelConfig
from ..errors import FuselmError
from ..formats.json_file import read_json_object
from ..formats.meta import read_consolidated

HELP_CONVERT = """\
Convert Meta's original Chameleon release (consolidated*.pth + params.json) to an HF directory.

META_DIR is the model folder (data/models/7b, holding params.json and consolidated*.pth) or the download root
(data/, holding models/<size>/ and tokenizer/). The model-parallel shards are merged (the 30B ships as 4),
q/k are permuted from Meta's interleaved rotary layout to HF's rotate-half, and the qk-norm gain/bias are
permuted with them. Weights are read with torch.load(weights_only=True): a file that needs pickled code is
refused, never executed. With tokenizer/ present, text_tokenizer.json becomes tokenizer.json
(<reserved08707> renamed to <image>, as HF does) and vqgan.ckpt is stored as model.vqmodel.* (decoder kept,
so fuselm can draw images).

qk-norm layout (Meta trained one gain/bias per model-parallel rank, shared by that rank's heads):
  --qk-norm per-head   one row per head, (heads, head_dim): HF's layout, loads in stock transformers (default)
  --qk-norm grouped    one row per shard, (shards, head_dim): Lumina-mGPT's layout; keeps heads tied if you
                       fine-tune. Loads in fuselm and Lumina-mGPT. `fuselm regroup-qknorm` converts later.

Examples:
  fuselm convert data/models/7b chameleon-7b-hf
  fuselm convert data/ chameleon-30b-hf --qk-norm grouped
"""
HELP_CONVERT_QK_NORM = "qk-norm layout of the output: per-head (HF, default) or grouped (one row per shard, Lumina)"

_SHARD = re.compile(r"consolidated\.(\d+)\.pth")


@dataclass(frozen=True)
class MetaFiles:
    """The files of one Meta checkpoint (tokenizer files are None when not found)."""

    model_dir: Path
    params: Path
    consolidate_params: Path | None
    shards: tuple[Path, ...]
    text_tokenizer: Path | None = None
    vqgan_yaml: Path | None = None
    vqgan_ckpt: Path | None = None


def _shard_files(model_dir: Path) -> tuple[Path, ...]:
    # Meta's detect_shard_count: consolidated.pth means one shard, otherwise consolidated.NN.pth.
    single = model_dir / "consolidated.pth"
    if single.is_file():
        return (single,)
    numbered = sorted((int(m.group(1)), p) for p in model_dir.glob("consolidated.*.pth")
                      if (m := _SHARD.fullmatch(p.name)))
    if not numbered:
        raise FuselmError(f"{model_dir}: no consolidated.pth or consolidated.NN.pth files")
    indices = [i for i, _ in numbered]
    if indices != list(range(len(indices))):
        raise FuselmError(f"{model_dir}: shard files are numbered {indices}, expected 00..{len(indices) - 1:02d}")
    return tuple(p for _, p in numbered)


def find_meta_checkpoint(path: str | Path) -> MetaFiles:
    """Locate params.json, the shards and (if present) the tokenizer folder from a model dir or download root."""
    path = Path(path)
    if not path.is_dir():
        raise FuselmError(f"{path}: not a directory")
    model_dir = path
    if not (path / "params.json").is_file():
        candidates = sorted(p.parent for p in path.glob("models/*/params.json"))
        if len(candidates) != 1:
            found = ", ".join(str(c) for c in candidates) or "none"
            raise FuselmError(f"{path}: expected params.json here or in exactly one models/<size>/ folder "
                              f"(found: {found}); pass the model folder itself")
        model_dir = candidates[0]
    tok_dir = next((d for d in (model_dir / "tokenizer", model_dir.parent / "tokenizer",
                                model_dir.parent.parent / "tokenizer") if d.is_dir()), None)

    def tok(name: str) -> Path | None:
        return tok_dir / name if tok_dir is not None and (tok_dir / name).is_file() else None

    consolidate = model_dir / "consolidate_params.json"
    return MetaFiles(model_dir=model_dir, params=model_dir / "params.json",
                     consolidate_params=consolidate if consolidate.is_file() else None,
                     shards=_shard_files(model_dir), text_tokenizer=tok("text_tokenizer.json"),
                     vqgan_yaml=tok("vqgan.yaml"), vqgan_ckpt=tok("vqgan.ckpt"))


def _read_json(path: Path) -> dict:
    return read_json_object(path)


def load_meta_checkpoint(path: str | Path) -> tuple[dict, list[dict[str, torch.Tensor]]]:
    """(merged params, shards) of a Meta checkpoint folder; params merged as Meta's loader does."""
    files = find_meta_checkpoint(path)
    params = _read_json(files.params)
    consolidate = _read_json(files.consolidate_params) if files.consolidate_params else None
    return merge_meta_params(params, consolidate), [read_consolidated(p) for p in files.shards]


def chameleon_tokenizer(text_tokenizer: Mapping, source: str = "text_tokenizer.json") -> tuple[dict, dict[str, int]]:
    """Meta's text_tokenizer.json -> (HF tokenizer.json dict, vocabulary_map), renaming <reserved08707> to <image>
    as HF's converter does (the image placeholder reuses a reserved id instead of growing the vocab)."""
    model = text_tokenizer.get("model")
    if not isinstance(model, Mapping) or not isinstance(model.get("vocab"), Mapping):
        raise FuselmError(f"{source}: expected model.vocab")
    tok = json.loads(json.dumps(text_tokenizer))  # deep copy of plain JSON
    vocab = tok["model"]["vocab"]
    if "<reserved08707>" in vocab:
        vocab["<image>"] = vocab.pop("<reserved08707>")
    added_tokens = tok.get("added_tokens", [])
    if not isinstance(added_tokens, list) or not all(isinstance(a, Mapping) for a in added_tokens):
        raise FuselmError(f"{source}: 'added_tokens' must be a list of objects")
    for added in added_tokens:
        if added.get("content") == "<reserved08707>":
            added["content"] = "<image>"
    return tok, dict(vocab)


@dataclass
class MetaConversion:
    config: ModelConfig
    state_dict: dict[str, torch.Tensor]  # internal names (archs.internal_to_hf gives HF names)
    vqgan_state_dict: dict[str, torch.Tensor] = field(default_factory=dict)  # VQGAN names (HF: under model.vqmodel.)
    tokenizer_json: dict | None = None  # write as tokenizer.json
    tokenizer_config: dict | None = None  # write as tokenizer_config.json
    report: list[str] = field(default_factory=list)


def convert_meta(path: str | Path, *, qk_norm: str = "per-head") -> MetaConversion:
    """Read a Meta checkpoint (and its tokenizer folder, when found) and convert it to internal names."""
    if qk_norm not in QK_NORM_LAYOUTS:
        raise FuselmError(f"--qk-norm must be one of {', '.join(QK_NORM_LAYOUTS)}, got {qk_norm!r}")
    files = find_meta_checkpoint(path)
    params, shards = load_meta_checkpoint(files.model_dir)
    try:
        config, state = meta_to_internal(params, shards, qk_norm=qk_norm)
    except FuselmError as err:  # archs/ knows tensors, not files: name the checkpoint here
        raise FuselmError(f"{files.model_dir}: {err}") from None
    report = [f"merged {len(shards)} shard(s) from {files.model_dir}: {config.num_hidden_layers} layers, "
              f"hidden {config.hidden_size}, {config.num_attention_heads} heads, vocab {config.vocab_size}"]
    if config.qk_norm:
        rows = state["layers.0.attn.q_norm.weight"].shape[0]
        report.append(f"qk-norm written {qk_norm}: q {rows} row(s), "
                      f"k {state['layers.0.attn.k_norm.weight'].shape[0]} row(s) per layer")
    out = MetaConversion(config=config, state_dict=state, report=report)
    extra = dict(config.extra)
    if files.text_tokenizer is not None:
        out.tokenizer_json, vocab = chameleon_tokenizer(_read_json(files.text_tokenizer),
                                                            str(files.text_tokenizer))
        extra["vocabulary_map"] = vocab
        special = {k: t for k, t in (("bos_token", "<s>"), ("eos_token", "</s>"), ("pad_token", "<pad>"),
                                     ("unk_token", "<unk>"), ("sep_token", "<reserved08706>")) if t in vocab}
        out.tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", **special}
        config = config.replace(bos_token_id=vocab.get("<s>"), pad_token_id=vocab.get("<pad>"),
                                eos_token_ids=(vocab["</s>"],) if "</s>" in vocab else ())
        report.append(f"tokenizer: {files.text_tokenizer} -> tokenizer.json (<reserved08707> renamed <image>)")
    else:
        report.append("tokenizer: no tokenizer/text_tokenizer.json found; none written")
    if files.vqgan_ckpt is not None and files.vqgan_yaml is not None:
        from ..vision.vqgan import load_meta_vqgan, vqgan_state_dict  # only conversion with images needs it

        vq = load_meta_vqgan(files.vqgan_ckpt, files.vqgan_yaml)
        extra["vq_config"] = vq.config.to_dict()
        out.vqgan_state_dict = vqgan_state_dict(vq)
        report.append(f"VQGAN: {files.vqgan_ckpt} -> model.vqmodel.* (encoder and decoder)")
    else:
        report.append("VQGAN: no tokenizer/vqgan.ckpt + vqgan.yaml found; the output cannot read or draw images")
    out.config = config.replace(extra=extra)
    return out
