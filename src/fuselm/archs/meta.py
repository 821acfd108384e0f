"""Meta's original release layout (Chameleon; Llama-style names): params.json, names, shard merge, rotary layout.

Meta's model-parallel shards split each weight the way its parallel layers compute:
- column-parallel (output rows split): wq, wk, wv, w1, w3, output  -> concatenated on dim 0
- row-parallel (input columns split): wo, w2                       -> concatenated on dim 1
- tok_embeddings: split along the embedding dim (dim 1) in Chameleon/Llama 2; along the vocab (dim 0) in
  Llama 3. Which one is read from the shard shapes.
- attention_norm, ffn_norm, norm: replicated (averaged on merge, as HF's and Lumina's converters do)
- q/k_normalization: (head_dim,) per shard and never reduced across ranks, so rank r's heads share its own
  gain/bias: they become one group per shard (num_shards, head_dim).
Meta rotates q/k in the interleaved (adjacent pairs) layout; HF and our model use rotate-half, so q/k rows are
permuted per head, and the qk-norm vectors (which act on the same head_dim positions) with them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ..config import ModelConfig, expected_shapes
from ..errors import FuselmError
from ..transforms.qknorm import expand_heads, group_heads
from .gguf import permute_for_interleaved_rope, unpermute_from_interleaved_rope
from .values import read_float, read_int

META_MODULES = {
    "embed": "tok_embeddings",
    "norm": "norm",
    "lm_head": "output",
    "layers.{i}.attn_norm": "layers.{i}.attention_norm",
    "layers.{i}.mlp_norm": "layers.{i}.ffn_norm",
    "layers.{i}.attn.q": "layers.{i}.attention.wq",
    "layers.{i}.attn.k": "layers.{i}.attention.wk",
    "layers.{i}.attn.v": "layers.{i}.attention.wv",
    "layers.{i}.attn.o": "layers.{i}.attention.wo",
    "layers.{i}.attn.q_norm": "layers.{i}.attention.q_normalization",
    "layers.{i}.attn.k_norm": "layers.{i}.attention.k_normalization",
    "layers.{i}.mlp.gate": "layers.{i}.feed_forward.w1",
    "layers.{i}.mlp.down": "layers.{i}.feed_forward.w2",
    "layers.{i}.mlp.up": "layers.{i}.feed_forward.w3",
}
# How each Meta module is split across model-parallel shards: concat dim, or None for replicated.
_SPLIT_DIM = {
    "attention.wq": 0, "attention.wk": 0, "attention.wv": 0, "feed_forward.w1": 0, "feed_forward.w3": 0,
    "output": 0, "attention.wo": 1, "feed_forward.w2": 1,
    "attention_norm": None, "ffn_norm": None, "norm": None,
}
# Meta's loader expects exactly this one extra buffer in the files.
_META_IGNORED = re.compile(r"^rope\.freqs$")
SOURCE = "params.json"
_QK = re.compile(r"layers\.\d+\.attention\.(q|k)_normalization\.(weight|bias)")
QK_NORM_LAYOUTS = ("per-head", "grouped")


def merge_meta_params(params: Mapping, consolidate_params: Mapping | None = None) -> dict:
    """params.json (+ consolidate_params.json) as Meta's loader merges them: top level, then "model", then
    consolidate_params."""
    model = params.get("model", {})
    if not isinstance(model, Mapping):
        raise FuselmError("params.json: 'model' must be a mapping")
    return {**params, **model, **(consolidate_params or {})}


def meta_intermediate_size(dim: int, ffn_dim_multiplier: float | None, multiple_of: int) -> int:
    """Meta's FeedForward width: int(2*4*dim/3), times the multiplier, rounded up to multiple_of."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def meta_config(params: Mapping, shards: list[Mapping[str, torch.Tensor]]) -> ModelConfig:
    """ModelConfig from merged params; sizes the params leave open (vocab -1) are read from the shards."""
    p = merge_meta_params(params)
    dim = read_int(p, "dim", SOURCE, limit="width")
    heads = read_int(p, "n_heads", SOURCE, limit="heads")
    kv_heads = read_int(p, "n_kv_heads", SOURCE, heads, limit="heads")
    n_shards = len(shards)
    embed = [s.get("tok_embeddings.weight") for s in shards]
    if any(e is None for e in embed):
        raise FuselmError("Meta checkpoint: a shard has no 'tok_embeddings.weight'")
    vocab = embed[0].shape[0] * (n_shards if embed[0].shape[1] == dim and n_shards > 1 else 1)
    declared = read_int(p, "vocab_size", SOURCE, -1, minimum=-1, limit="vocab")
    if declared > 0 and declared != vocab:
        raise FuselmError(f"params.json: vocab_size {p['vocab_size']} but tok_embeddings holds {vocab} rows")
    w1 = shards[0].get("layers.0.feed_forward.w1.weight")
    if w1 is None:
        raise FuselmError("Meta checkpoint: missing 'layers.0.feed_forward.w1.weight'")
    intermediate = w1.shape[0] * n_shards
    # Meta builds the model from these (multiple_of defaults to 256), so the weights must agree.
    want = meta_intermediate_size(dim, read_float(p, "ffn_dim_multiplier", SOURCE, None),
                                  read_int(p, "multiple_of", SOURCE, 256, limit="width"))
    if want != intermediate:
        raise FuselmError(f"params.json: dim/ffn_dim_multiplier/multiple_of give a feed-forward width of {want},"
                          f" but feed_forward.w1 holds {intermediate} rows")
    if p.get("use_scaled_rope"):
        raise FuselmError("params.json: use_scaled_rope (Llama 3.1 rope scaling) is not supported for Meta checkpoints;"
                          " convert the HF release instead")
    if dim % heads or (dim // heads) % 2:
        raise FuselmError(f"params.json: dim {dim} does not split into {heads} heads of an even width (n_heads)")
    qk_norm = bool(p.get("qk_normalization", False))
    swin = bool(p.get("swin_norm", False))
    if swin and not qk_norm:
        raise FuselmError("params.json: swin_norm without qk_normalization matches no supported architecture")
    theta = read_float(p, "rope_theta", SOURCE, 10000.0)
    # HF's Chameleon converter: 4096 positions, or 16384 for the long-context theta.
    max_pos = read_int(p, "max_seq_len", SOURCE, 16384 if theta > 10000.0 else 4096, limit="context")
    try:
        return ModelConfig(
            arch="chameleon" if qk_norm else "llama",
            vocab_size=int(vocab),
            hidden_size=dim,
            intermediate_size=int(intermediate),
            num_hidden_layers=read_int(p, "n_layers", SOURCE, limit="layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=dim // heads,
            max_position_embeddings=max_pos,
            norm_eps=read_float(p, "norm_eps", SOURCE, 1e-5),
            block_kind="swin_norm" if swin else "pre_norm",
            qk_norm=qk_norm,
            qk_norm_eps=1e-5,  # torch.nn.LayerNorm(head_dim) default
            rope_theta=theta,
        )
    except FuselmError as e:
        raise FuselmError(f"params.json: {e}") from None


def _meta_name(internal: str) -> str:
    module, kind = internal.rsplit(".", 1)
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", module)
    key = "layers.{i}." + m.group(2) if m else module
    if key not in META_MODULES:
        raise FuselmError(f"state dict: tensor {internal!r} has no Meta name")
    return META_MODULES[key].replace("{i}", m.group(1) if m else "") + "." + kind


def _split_kind(meta_name: str) -> str:
    return re.sub(r"^layers\.\d+\.", "", meta_name).rsplit(".", 1)[0]


def _merge(name: str, parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    if len(parts) == 1:
        return parts[0]
    if name == "tok_embeddings.weight":
        axis = 1 if parts[0].shape[1] * len(parts) == dim else 0
        return torch.cat(parts, dim=axis)
    kind = _split_kind(name)
    if kind not in _SPLIT_DIM:
        raise FuselmError(f"Meta checkpoint: unexpected tensor {name!r}")
    axis = _SPLIT_DIM[kind]
    if axis is None:  # replicated
        return torch.stack([t.float() for t in parts]).mean(dim=0).to(parts[0].dtype)
    return torch.cat(parts, dim=axis)


def meta_to_internal(params: Mapping, shards: list[Mapping[str, torch.Tensor]], *,
                     qk_norm: str = "per-head") -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Meta's consolidated shards -> (ModelConfig, internal state dict in HF's rotate-half layout).

    qk_norm="per-head": one row per head (HF's layout); "grouped": one row per shard (Lumina-mGPT's layout).
    """
    if qk_norm not in QK_NORM_LAYOUTS:
        raise FuselmError(f"qk_norm must be one of {QK_NORM_LAYOUTS}, got {qk_norm!r}")
    if not shards:
        raise FuselmError("Meta checkpoint: no consolidated*.pth shards")
    config = meta_config(params, shards)
    c, n = config, len(shards)
    for div, what in ((c.num_attention_heads, "n_heads"), (c.num_key_value_heads, "n_kv_heads"),
                      (c.intermediate_size, "feed-forward width")):
        if div % n:
            raise FuselmError(f"Meta checkpoint: {what} ({div}) does not split over {n} shards")
    names = [k for k in shards[0] if not _META_IGNORED.match(k)]
    for i, s in enumerate(shards[1:], start=1):
        if set(k for k in s if not _META_IGNORED.match(k)) != set(names):
            diff = sorted(set(s) ^ set(shards[0]))
            raise FuselmError(f"Meta checkpoint: shard {i} holds different tensors than shard 0 (first: {diff[:3]})")
    table = {meta: ours for ours, meta in META_MODULES.items()}
    out: dict[str, torch.Tensor] = {}
    for name in names:
        module, kind = name.rsplit(".", 1)
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", module)
        key = "layers.{i}." + m.group(2) if m else module
        if key not in table:
            raise FuselmError(f"Meta checkpoint: unexpected tensor {name!r} (not part of this architecture)")
        ours = table[key].replace("{i}", m.group(1) if m else "") + "." + kind
        parts = [s[name] for s in shards]
        qk = _QK.fullmatch(name)
        if qk:
            heads = c.num_attention_heads if qk.group(1) == "q" else c.num_key_value_heads
            rows = torch.stack(parts)  # (shards, head_dim), in the interleaved order
            rows = unpermute_from_interleaved_rope(rows.reshape(-1), n).reshape(rows.shape)
            out[ours] = expand_heads(rows, heads, name=ours) if qk_norm == "per-head" else rows
            continue
        t = _merge(name, parts, c.hidden_size)
        if ours.startswith("layers.") and (".attn.q." in ours or ".attn.k." in ours):
            t = unpermute_from_interleaved_rope(t, c.num_attention_heads if ".attn.q." in ours
                                                else c.num_key_value_heads)
        out[ours] = t
    groups = None if qk_norm == "per-head" or not c.qk_norm else (n, n)
    for name, shape in expected_shapes(config, groups).items():
        if name not in out:
            raise FuselmError(f"Meta checkpoint: missing tensor {_meta_name(name)!r}")
        if tuple(out[name].shape) != tuple(shape):
            raise FuselmError(f"Meta checkpoint: tensor {_meta_name(name)!r} merges to shape "
                              f"{list(out[name].shape)}, expected {list(shape)}")
    return config, out


def meta_params(config: ModelConfig, num_shards: int) -> dict:
    """params.json for a config; multiple_of/ffn_dim_multiplier are chosen so Meta's formula gives its width."""
    dim, width = config.hidden_size, config.intermediate_size
    if meta_intermediate_size(dim, None, 256) == width:
        ffn = {"multiple_of": 256, "ffn_dim_multiplier": None}
    else:  # round up to the width itself from just below it
        ffn = {"multiple_of": width, "ffn_dim_multiplier": width / int(2 * 4 * dim / 3)}
    return {
        "dim": config.hidden_size,
        "n_layers": config.num_hidden_layers,
        "n_heads": config.num_attention_heads,
        "n_kv_heads": config.num_key_value_heads,
        "vocab_size": config.vocab_size,
        **ffn,
        "norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "qk_normalization": config.qk_norm,
        "swin_norm": config.block_kind == "swin_norm",
        "max_seq_len": config.max_position_embeddings,
        "model_parallel_size": num_shards,
    }


def internal_to_meta(config: ModelConfig, state_dict: Mapping[str, torch.Tensor],
                     num_shards: int = 1) -> tuple[dict, list[dict[str, torch.Tensor]]]:
    """Internal state dict -> (params.json dict, Meta shards). The inverse of meta_to_internal.

    qk-norm weights (any grouping) must be equal within each shard's heads; otherwise FuselmError.
    """
    c, n = config, num_shards
    if c.arch not in ("llama", "chameleon") or c.norm_kind != "rms" or c.mlp_kind != "swiglu":
        raise FuselmError(f"Meta's layout holds Llama/Chameleon models only, not {c.arch!r}")
    if c.qkv_bias or c.o_bias or c.mlp_bias or c.flashnorm:
        raise FuselmError("Meta's layout has no linear biases and no FlashNorm flag")
    for size, what in ((c.num_attention_heads, "num_attention_heads"), (c.num_key_value_heads, "num_key_value_heads"),
                       (c.intermediate_size, "intermediate_size"), (c.hidden_size, "hidden_size"),
                       (c.vocab_size, "vocab_size")):
        if size % n:
            raise FuselmError(f"{what} ({size}) does not split over {n} shards")
    sd = dict(state_dict)
    if c.tie_word_embeddings:
        sd["lm_head.weight"] = sd["embed.weight"]
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for ours, t in sd.items():
        name = _meta_name(ours)
        qk = _QK.fullmatch(name)
        if qk:
            heads = c.num_attention_heads if qk.group(1) == "q" else c.num_key_value_heads
            rows = group_heads(expand_heads(t, heads, name=ours), n, name=ours)
            rows = permute_for_interleaved_rope(rows.reshape(-1), n).reshape(rows.shape)
            for s in range(n):
                shards[s][name] = rows[s].clone()
            continue
        if ".attn.q." in ours or ".attn.k." in ours:
            t = permute_for_interleaved_rope(t, c.num_attention_heads if ".attn.q." in ours
                                             else c.num_key_value_heads)
        kind = _split_kind(name)
        axis = 1 if name == "tok_embeddings.weight" else _SPLIT_DIM.get(kind)
        pieces = [t] * n if axis is None else list(t.chunk(n, dim=axis))
        for s in range(n):
            shards[s][name] = pieces[s].clone()
    return meta_params(config, n), shards
