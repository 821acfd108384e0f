"""Chameleon's VQGAN (the taming-transformers design): encoder, codebook, decoder, and checkpoint loaders.

Module names are the taming ones, so Meta's `vqgan.ckpt` loads with no renames and HF's
`model.vqmodel.*` loads by stripping the prefix (HF keeps the taming names but has no decoder).
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fuselm.errors import FuselmError

# HF stores the VQ model under these prefixes (full model, or the bare ChameleonVQVAE has none).
HF_PREFIXES = ("model.vqmodel.", "vqmodel.")
# Meta's checkpoint is a training checkpoint: the discriminator / LPIPS weights sit under `loss.`.
META_IGNORED_PREFIXES = ("loss.",)
# taming ddconfig key -> our field name (HF's convert script uses the same renames).
META_DDCONFIG_KEYS = {
    "ch": "base_channels",
    "out_ch": "out_channels",
    "ch_mult": "channel_multiplier",
    "num_res_blocks": "num_res_blocks",
    "attn_resolutions": "attn_resolutions",
    "dropout": "dropout",
    "in_channels": "in_channels",
    "resolution": "resolution",
    "z_channels": "latent_channels",
    "double_z": "double_latent",
}
# taming ddconfig switches we do not implement: the value each must have.
META_DDCONFIG_FIXED = {
    "resamp_with_conv": True,
    "give_pre_end": False,
    "tanh_out": False,
    "use_linear_attn": False,
    "attn_type": "vanilla",
}
GROUPNORM_GROUPS = 32


@dataclass(frozen=True)
class VQGANConfig:
    """VQGAN shape; field names follow HF's ChameleonVQVAEConfig, defaults are Chameleon's (512^2 -> 32x32)."""

    embed_dim: int = 256
    num_embeddings: int = 8192
    double_latent: bool = False
    latent_channels: int = 256
    resolution: int = 512
    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 128
    channel_multiplier: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()  # () = attention in the mid blocks only
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("channel_multiplier", "attn_resolutions"):
            value = getattr(self, name) or ()
            if not isinstance(value, (list, tuple)) or not all(
                    isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise FuselmError(f"VQGAN config: {name} must be a list of integers, got {value!r:.80}")
            object.__setattr__(self, name, tuple(value))
        dropout = self.dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise FuselmError(f"VQGAN config: dropout must be a number in [0, 1), got {dropout!r:.80}")
        if not isinstance(self.double_latent, bool):
            raise FuselmError(f"VQGAN config: double_latent must be true or false, got {self.double_latent!r:.80}")
        for name in ("embed_dim", "num_embeddings", "latent_channels", "resolution", "in_channels",
                     "out_channels", "base_channels", "num_res_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise FuselmError(f"VQGAN config: {name} must be a positive int, got {value!r}")
        if not self.channel_multiplier or min(self.channel_multiplier) <= 0:
            raise FuselmError(f"VQGAN config: channel_multiplier must be positive ints, got "
                              f"{list(self.channel_multiplier)}")
        bad = [self.base_channels * m for m in self.channel_multiplier if self.base_channels * m % GROUPNORM_GROUPS]
        if bad:
            raise FuselmError(f"VQGAN config: base_channels*channel_multiplier must be multiples of "
                              f"{GROUPNORM_GROUPS} (GroupNorm groups), got {bad}")
        if self.double_latent:
            # double_z is the KL-autoencoder switch; a VQ model's quant_conv reads latent_channels.
            raise FuselmError("VQGAN config: double_latent=True is a KL-autoencoder setting; a VQGAN needs False")
        if self.resolution % self.downsample_factor:
            raise FuselmError(f"VQGAN config: resolution {self.resolution} is not a multiple of the "
                              f"downsample factor {self.downsample_factor}")

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent cell along each side (16 for Chameleon)."""
        return 2 ** (len(self.channel_multiplier) - 1)

    def to_dict(self) -> dict[str, Any]:
        """Plain values only (ints, floats, bools, lists), for JSON/GGUF companions."""
        d = asdict(self)
        d["channel_multiplier"] = list(self.channel_multiplier)
        d["attn_resolutions"] = list(self.attn_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "VQGAN config") -> VQGANConfig:
        """From our own dict or HF's `vq_config` (or a whole HF config.json dict holding `vq_config`).

        Missing keys take the defaults (HF's own semantics); HF's generic PretrainedConfig keys are ignored.
        """
        if "vq_config" in d:
            d = d["vq_config"]
        if not isinstance(d, Mapping):
            raise FuselmError(f"{source}: expected a dict of VQGAN settings, got {type(d).__name__}")
        attn_type = d.get("attn_type", "vanilla")
        if attn_type != "vanilla":
            raise FuselmError(f"{source}: attn_type {attn_type!r} is not supported (expected 'vanilla')")
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        if kwargs.get("attn_resolutions") is None:
            kwargs.pop("attn_resolutions", None)
        try:
            return cls(**kwargs)
        except FuselmError as e:
            raise FuselmError(f"{source}: {e}") from None
        except TypeError as e:
            raise FuselmError(f"{source}: bad VQGAN setting: {e}") from None


def _swish(x: torch.Tensor) -> torch.Tensor:
    # x * sigmoid(x), written out as taming/HF do (F.silu can differ in the last bit, which can flip argmin).
    return x * torch.sigmoid(x)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPNORM_GROUPS, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(self.dropout(_swish(self.norm2(h))))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, 1x1 convs for q/k/v/out, scale c^-0.5."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q = self.q(y).reshape(b, c, h * w).transpose(1, 2)  # b, hw, c
        k = self.k(y).reshape(b, c, h * w)  # b, c, hw
        v = self.v(y).reshape(b, c, h * w)
        attn = torch.softmax(torch.bmm(q, k) * c**-0.5, dim=2)  # b, hw(query), hw(key)
        out = torch.bmm(v, attn.transpose(1, 2)).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # taming pads right/bottom only


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution: res blocks (each optionally followed by attention), then an optional resample."""

    def __init__(self, channels_in: int, channels_out: int, n_blocks: int, with_attn: bool, dropout: float):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(channels_in if i == 0 else channels_out, channels_out, dropout) for i in range(n_blocks)
        )
        self.attn = nn.ModuleList(AttnBlock(channels_out) for _ in range(n_blocks if with_attn else 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        ch, mult = cfg.base_channels, cfg.channel_multiplier
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        res, c_in = cfg.resolution, ch
        for i, m in enumerate(mult):
            level = Level(c_in, ch * m, cfg.num_res_blocks, res in cfg.attn_resolutions, cfg.dropout)
            if i != len(mult) - 1:
                level.downsample = Downsample(ch * m)
                res //= 2
            self.down.append(level)
            c_in = ch * m
        self.mid = MidBlock(c_in, cfg.dropout)
        self.norm_out = _norm(c_in)
        self.conv_out = nn.Conv2d(c_in, cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            h = level(h)
            if i != len(self.down) - 1:
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(_swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        ch, mult = cfg.base_channels, cfg.channel_multiplier
        c_in = ch * mult[-1]
        res = cfg.resolution // cfg.downsample_factor
        self.conv_in = nn.Conv2d(cfg.latent_channels, c_in, 3, padding=1)
        self.mid = MidBlock(c_in, cfg.dropout)
        levels: list[Level] = []
        for i in reversed(range(len(mult))):  # built coarse -> fine, stored fine -> coarse (taming's indices)
            level = Level(c_in, ch * mult[i], cfg.num_res_blocks + 1, res in cfg.attn_resolutions, cfg.dropout)
            if i != 0:
                level.upsample = Upsample(ch * mult[i])
                res *= 2
            levels.insert(0, level)
            c_in = ch * mult[i]
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(c_in)
        self.conv_out = nn.Conv2d(c_in, cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for i in reversed(range(len(self.up))):
            h = self.up[i](h)
            if i != 0:
                h = self.up[i].upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))


class Codebook(nn.Module):
    def __init__(self, num_embeddings: int, embed_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, embed_dim)


def nearest_code(z: torch.Tensor, codebook: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Index of the nearest codebook row for each row of z[N, D]: argmin |z|^2 + |e|^2 - 2 z.e (as taming/HF).

    Computed in float32 in row chunks, so a [N, 8192] distance matrix never gets large.
    """
    z, e = z.float(), codebook.float()
    e_sq = (e**2).sum(dim=1)
    out = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
    for start in range(0, z.shape[0], chunk):
        zc = z[start : start + chunk]
        d = (zc**2).sum(dim=1, keepdim=True) + e_sq - 2 * (zc @ e.T)
        out[start : start + chunk] = d.argmin(dim=1)
    return out


class VQGAN(nn.Module):
    """pixels in [-1, 1] <-> codebook indices. `decoder=False` builds an encoder-only model (HF checkpoints)."""

    def __init__(self, config: VQGANConfig, *, decoder: bool = True):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config) if decoder else None
        self.quant_conv = nn.Conv2d(config.latent_channels, config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.latent_channels, 1)
        self.quantize = Codebook(config.num_embeddings, config.embed_dim)
        self.eval()

    @property
    def has_decoder(self) -> bool:
        return self.decoder is not None

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Latent grid (h, w) for an image of height x width pixels."""
        f = self.config.downsample_factor
        if height % f or width % f:
            raise FuselmError(f"VQGAN: image size {height}x{width} is not a multiple of {f} pixels")
        return height // f, width // f

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels float[B, C, H, W] in [-1, 1] -> LongTensor[B, h*w] codebook indices (row-major grid)."""
        if pixels.ndim != 4 or pixels.shape[1] != self.config.in_channels or not pixels.is_floating_point():
            raise FuselmError(f"VQGAN.encode: expected float pixels [B, {self.config.in_channels}, H, W], "
                              f"got {pixels.dtype} {list(pixels.shape)}")
        self.grid(pixels.shape[2], pixels.shape[3])
        w_in, w_q = self.encoder.conv_in.weight, self.quant_conv.weight
        h = self.encoder(pixels.to(device=w_in.device, dtype=w_in.dtype))
        z = self.quant_conv(h.to(w_q.dtype))
        b, d, h, w = z.shape
        codes = nearest_code(z.permute(0, 2, 3, 1).reshape(-1, d), self.quantize.embedding.weight)
        return codes.view(b, h * w)

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """codes LongTensor[B, h*w] -> float[B, out_channels, h*f, w*f], unclamped (roughly [-1, 1])."""
        if self.decoder is None:
            raise FuselmError("VQGAN.decode: this VQGAN has no decoder weights (HF Chameleon checkpoints ship "
                              "the encoder only); load Meta's vqgan.ckpt to decode images")
        if codes.ndim != 2 or codes.shape[1] != h * w or codes.dtype not in (torch.int32, torch.int64):
            raise FuselmError(f"VQGAN.decode: expected integer codes [B, {h * w}] for a {h}x{w} grid, "
                              f"got {codes.dtype} {list(codes.shape)}")
        n = self.config.num_embeddings
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= n):
            raise FuselmError(f"VQGAN.decode: codes must lie in [0, {n}), got range "
                              f"[{int(codes.min())}, {int(codes.max())}]")
        emb = self.quantize.embedding.weight
        z = emb[codes.to(emb.device).long()].view(codes.shape[0], h, w, -1).permute(0, 3, 1, 2)
        z = self.post_quant_conv(z.to(self.post_quant_conv.weight.dtype))
        # Casts at the seams let a caller run the decoder alone in bf16 (fast) while encoding stays exact.
        return self.decoder(z.to(self.decoder.conv_in.weight.dtype)).float()


# ---- state dicts ---------------------------------------------------------------------------------------


def vqgan_state_dict(model: VQGAN) -> dict[str, torch.Tensor]:
    """Our (= taming) tensor names -> tensors, detached and contiguous; the decoder only if present."""
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def hf_to_vqgan_names(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF names -> ours: keep the `model.vqmodel.` (or `vqmodel.`) subtree and strip the prefix.

    A bare ChameleonVQVAE state dict has no prefix and passes through unchanged.
    """
    for prefix in HF_PREFIXES:
        if any(k.startswith(prefix) for k in state_dict):
            return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return dict(state_dict)


def meta_to_vqgan_names(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Meta (taming) names are ours; only the training-loss weights are dropped."""
    return {k: v for k, v in state_dict.items() if not k.startswith(META_IGNORED_PREFIXES)}


def _check_keys(model: VQGAN, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (first: {missing[:4]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensors (first: {unexpected[:4]})")
        raise FuselmError(f"{source}: VQGAN weights do not match the config: {'; '.join(parts)}")
    for name, ref in expected.items():
        got = state_dict[name]
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(ref.shape):
            shape = list(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise FuselmError(f"{source}: tensor {name!r} has shape {shape}, expected {list(ref.shape)}")


def vqgan_from_state_dict(
    config: VQGANConfig, state_dict: Mapping[str, torch.Tensor], *, source: str = "VQGAN state dict"
) -> VQGAN:
    """Build a VQGAN from our tensor names; the decoder is built only when `decoder.*` tensors are present."""
    has_decoder = any(k.startswith("decoder.") for k in state_dict)
    with torch.device("meta"):  # shapes first: a corrupt config must not allocate a model it then rejects
        model = VQGAN(config, decoder=has_decoder)
    _check_keys(model, state_dict, source)
    model.to_empty(device="cpu")  # every parameter is loaded next: no random initialization to throw away
    model.load_state_dict(dict(state_dict), strict=True)
    return model


def vqgan_from_hf_state_dict(config_dict: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], *,
                             source: str = "HF checkpoint") -> VQGAN:
    """From HF's `vq_config` (or whole config.json dict) and a state dict (full model or bare VQ model).

    HF checkpoints carry no decoder, so the result is encoder-only and `decode` raises. `source` (the directory)
    is named in errors."""
    if not isinstance(config_dict, Mapping):
        raise FuselmError(f"{source}: config.json key 'vq_config' must be an object, got {type(config_dict).__name__}")
    config = VQGANConfig.from_dict(config_dict, source=f"{source}: config.json vq_config")
    return vqgan_from_state_dict(config, hf_to_vqgan_names(state_dict), source=f"{source}: VQGAN weights")


def vqgan_config_from_meta_yaml(params: Mapping[str, Any], *, source: str = "vqgan.yaml") -> VQGANConfig:
    """From taming's `model.params` mapping (embed_dim, n_embed, ddconfig{...})."""
    dd = params.get("ddconfig")
    if not isinstance(dd, Mapping):
        raise FuselmError(f"{source}: model.params.ddconfig is missing or not a mapping")
    for key, want in META_DDCONFIG_FIXED.items():
        if key in dd and dd[key] != want:
            raise FuselmError(f"{source}: ddconfig.{key}={dd[key]!r} is not supported (expected {want!r})")
    kwargs: dict[str, Any] = {ours: dd[theirs] for theirs, ours in META_DDCONFIG_KEYS.items() if theirs in dd}
    for theirs, ours in (("embed_dim", "embed_dim"), ("n_embed", "num_embeddings")):
        if theirs not in params:
            raise FuselmError(f"{source}: model.params.{theirs} is missing")
        kwargs[ours] = params[theirs]
    return VQGANConfig.from_dict(kwargs, source=source)


def load_meta_vqgan(ckpt_path: str | Path, yaml_path: str | Path) -> VQGAN:
    """Meta's `tokenizer/vqgan.ckpt` + `vqgan.yaml` (encoder and decoder).

    The checkpoint is read with torch.load(weights_only=True); a file that needs arbitrary pickled objects is
    refused rather than executed.
    """
    import yaml  # only this loader needs it

    try:
        with open(yaml_path, encoding="utf-8") as f:
            cfg = yaml.safe_load(f)
    except OSError as e:
        raise FuselmError(f"{yaml_path}: cannot read VQGAN yaml: {e}") from None
    except yaml.YAMLError as e:
        raise FuselmError(f"{yaml_path}: not valid YAML: {e}") from None
    params = cfg.get("model", {}).get("params") if isinstance(cfg, Mapping) else None
    if not isinstance(params, Mapping):
        raise FuselmError(f"{yaml_path}: expected a taming config with model.params")
    config = vqgan_config_from_meta_yaml(params, source=str(yaml_path))

    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise FuselmError(f"{ckpt_path}: refusing to load: the checkpoint needs pickled code beyond plain tensors "
                          f"(torch.load weights_only=True failed: {str(e).splitlines()[0]})") from None
    except (OSError, RuntimeError, EOFError) as e:
        raise FuselmError(f"{ckpt_path}: cannot read VQGAN checkpoint: {e}") from None
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, Mapping) else None
    if not isinstance(sd, Mapping):
        raise FuselmError(f"{ckpt_path}: expected a dict with a 'state_dict' of tensors")
    return vqgan_from_state_dict(config, meta_to_vqgan_names(sd), source=str(ckpt_path))
