"""FlashNorm (arXiv 2407.09577): fold norm weights into the linears that read the norm's output.

A norm's output y = n(x) * g (+ beta) feeding a linear W x + c is, exactly,
    W (n*g + beta) + c = (W diag g) n + (c + W beta)
so the gain moves into W's input columns and a LayerNorm bias moves into the linear's bias. The norm then keeps
only its parameter-free part. This holds only when every reader of the norm is such a linear:
- swin_norm blocks put the norm after the sublayer, where its output joins the residual stream: not foldable;
- a final norm before a tied lm_head would also rescale the input embeddings: not foldable;
- a final LayerNorm bias has nowhere to go (lm_head has no bias).
Those norms are kept as they are and reported; everything else is folded.

Compat mode leaves folded norms as ones (zero bias) so any loader reads the result as the same architecture.
Strict mode removes them and sets config.flashnorm, which the loader needs to accept the missing tensors.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from ..config import ModelConfig, is_norm_weight
from ..errors import FuselmError

HELP_FLASHIFY = """\
Fold the norm weights of a checkpoint into the following linear layers (FlashNorm, arXiv 2407.09577).

Every RMSNorm/LayerNorm gain g that feeds linears is multiplied into their input columns (W' = W diag g);
a LayerNorm bias beta moves into the linears' bias (c' = c + W beta). The folded model computes the same
logits (float32: equal to about 1e-7 relative); in bf16 the folded weights are rounded once more.

  Llama, Chameleon  input norm -> q, k, v; post-attention norm -> gate, up; final norm -> lm_head if untied.
  Falcon            LayerNorm gain and bias -> query_key_value and dense_h_to_4h. Falcon has one `bias` flag
                    for all four linears, so folding a nonzero LayerNorm bias turns it on: the new biases are
                    W beta, and dense / dense_4h_to_h get zero biases.
Not foldable, kept and reported: Chameleon swin_norm layers (the norm follows the sublayer) and a final norm
in front of a tied lm_head (folding would rescale the input embeddings too).

Output modes:
  (default) compat  folded norms are stored as ones (and zero bias), so tools that know the architecture
                    (transformers, vLLM, ...) load the result unchanged. Use this to share the checkpoint.
  --strict          folded norm tensors are removed and config.json gets "flashnorm": true (GGUF: the
                    fuselm.flashnorm key). Smaller and explicit, but only loaders that honour the flag accept
                    it: fuselm does; vLLM refuses missing weights; transformers silently fills ones.
Loading: a checkpoint with missing norm weights loads only when config.json has "flashnorm",
"flashnorm_folded" or "flash_norm" set to true; otherwise fuselm names the missing tensor and stops.

Examples:
  fuselm flashify llama-hf/ llama-flash/                 compat, loads everywhere
  fuselm flashify llama-hf/ llama-flash/ --strict        norms removed, "flashnorm": true
  fuselm flashify falcon-7b/ falcon-flash.gguf --format gguf
"""
HELP_FLASHIFY_STRICT = ("remove the folded norm tensors and write an explicit flashnorm flag "
                        "(default: keep them as ones so every tool loads the result)")


def _layer_ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    parts, start = [], None
    for i, n in enumerate(layers):
        if start is None:
            start = n
        if i + 1 == len(layers) or layers[i + 1] != n + 1:
            parts.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ", ".join(parts)


def fold_plan(config: ModelConfig) -> tuple[list[tuple[str, tuple[str, ...]]], list[tuple[str, str]]]:
    """Which norm feeds which linears: ([(norm module, (linear modules...))], [(norm module, why not)])."""
    c = config
    mlp_in = ("mlp.gate", "mlp.up") if c.mlp_kind == "swiglu" else ("mlp.up",)
    folds: list[tuple[str, tuple[str, ...]]] = []
    refused: list[tuple[str, str]] = []
    for i in range(c.num_hidden_layers):
        p = f"layers.{i}."
        if c.block_kind == "swin_norm":
            why = "swin_norm applies these norms after the sublayer, where the output joins the residual, not a linear"
            refused += [(p + "attn_norm", why), (p + "mlp_norm", why)]
        elif c.block_kind == "parallel" and c.parallel_norms == 1:
            folds.append((p + "attn_norm", tuple(p + n for n in ("attn.q", "attn.k", "attn.v", *mlp_in))))
        else:
            folds.append((p + "attn_norm", tuple(p + n for n in ("attn.q", "attn.k", "attn.v"))))
            folds.append((p + "mlp_norm", tuple(p + n for n in mlp_in)))
    if c.tie_word_embeddings:
        refused.append(("norm", "lm_head is tied to the input embedding; folding the gain would rescale it too"))
    else:
        folds.append(("norm", ("lm_head",)))
    return folds, refused


def _linear_modules(config: ModelConfig) -> list[str]:
    names = ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down"]
    if config.mlp_kind == "swiglu":
        names.append("mlp.gate")
    return [f"layers.{i}.{n}" for i in range(config.num_hidden_layers) for n in names]


def flashify(config: ModelConfig, state_dict: Mapping[str, torch.Tensor], *,
             strict: bool) -> tuple[ModelConfig, dict[str, torch.Tensor], list[str]]:
    """Fold norm weights into the following linears. Returns (new config, new state dict, report lines).

    Pure: the input is not modified. Weights are multiplied in float32 and stored in their own dtype
    (as transformer-tricks does); LayerNorm-bias products are accumulated in float64.
    """
    folds, refused = fold_plan(config)
    sd = dict(state_dict)
    report: list[str] = []
    folded: dict[tuple[str, tuple[str, ...]], list[int]] = {}  # (norm kind, linear kinds) -> layers
    added_bias: list[str] = []
    removed = 0
    with torch.no_grad():
        for norm, targets in folds:
            w_name, b_name = norm + ".weight", norm + ".bias"
            if w_name not in sd:
                if config.flashnorm:
                    continue  # already folded and removed (strict FlashNorm source)
                raise FuselmError(f"tensor {w_name!r} is missing and the config has no flashnorm flag")
            g = sd[w_name].float()
            beta = sd[b_name].double() if config.norm_bias and b_name in sd else None
            if beta is not None and not bool(beta.any()):
                beta = None  # a zero LayerNorm bias contributes nothing
            if beta is not None and "lm_head" in targets:
                refused.append((norm, "its LayerNorm bias cannot move into lm_head, which has no bias"))
                continue
            for t in targets:
                w = sd[t + ".weight"]
                if beta is not None:
                    shift = w.double() @ beta
                    c = sd.get(t + ".bias")
                    if c is None:
                        added_bias.append(t + ".bias")
                    sd[t + ".bias"] = (shift if c is None else c.double() + shift).to(w.dtype)
                sd[t + ".weight"] = (w.float() * g).to(w.dtype)  # W diag g: scale input columns
            if strict:
                sd.pop(w_name)
                removed += 1
                if b_name in sd:
                    sd.pop(b_name)
                    removed += 1
            else:
                sd[w_name] = torch.ones_like(sd[w_name])
                if b_name in sd:
                    sd[b_name] = torch.zeros_like(sd[b_name])
            kind = norm.rsplit(".", 1)[-1] if norm.startswith("layers.") else "final norm"
            layer = int(norm.split(".")[1]) if norm.startswith("layers.") else -1
            folded.setdefault((kind, tuple(t.split(".", 2)[-1] for t in targets)), []).append(layer)

    for (kind, linears), layers in folded.items():
        where = "" if layers == [-1] else f" of layers {_layer_ranges(layers)}"
        report.append(f"folded {kind}{where} into {', '.join(linears)}")
    by_reason: dict[str, list[str]] = {}
    for norm, why in refused:
        by_reason.setdefault(why, []).append(norm)
    for why, norms in by_reason.items():
        layers = sorted({int(n.split(".")[1]) for n in norms if n.startswith("layers.")})
        kinds = sorted({n.rsplit(".", 1)[-1] for n in norms if n.startswith("layers.")})
        what = [f"{', '.join(kinds)} of layers {_layer_ranges(layers)}"] if layers else []
        what += ["final norm"] if "norm" in norms else []
        report.append(f"kept {' and '.join(what)} unfolded: {why}")

    new_config = config
    if added_bias:
        # One bias flag per linear family (Falcon: one for all four), so every linear gets a bias; zeros where
        # the fold put nothing.
        dtype = sd[added_bias[0].rsplit(".", 1)[0] + ".weight"].dtype
        zeros = []
        for module in _linear_modules(config):
            if module + ".bias" not in sd:
                sd[module + ".bias"] = torch.zeros(sd[module + ".weight"].shape[0], dtype=dtype)
                zeros.append(module.split(".", 2)[-1])
        new_config = new_config.replace(qkv_bias=True, o_bias=True, mlp_bias=True)
        report.append(f"added {len(added_bias)} bias tensors holding W*beta (LayerNorm bias moved past the linear)"
                      + (f" and {len(zeros)} zero biases ({', '.join(sorted(set(zeros)))}) because the "
                         f"bias flag covers every linear" if zeros else "")
                      + "; config now has q/k/v, output and MLP biases (HF: attention_bias and mlp_bias; "
                        "Falcon: bias) true")
    if strict and removed:
        new_config = new_config.replace(flashnorm=True)
        report.append(f"strict: removed {removed} folded norm tensor(s); config flashnorm=true "
                      f"(written as \"flashnorm\": true); loaders must honour it")
    elif folded:
        report.append("compat: folded norms stored as ones" + (" (biases zero)" if config.norm_bias else "")
                      + " so other tools load the result")
    if not folded:
        report.append("nothing was folded")
    return new_config, sd, report


def check_flashnorm_state(config: ModelConfig, present_names: Iterable[str],
                          expected_names: Iterable[str] | Mapping[str, tuple], source: str = "checkpoint",
                          *, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The loader's rule for missing tensors. Returns fill-ins for missing norm tensors, or raises.

    A missing norm weight (attn_norm, mlp_norm, final norm) is allowed only when config.flashnorm is set (HF keys
    flashnorm / flashnorm_folded / flash_norm, GGUF fuselm.flashnorm): it loads as ones, a missing norm bias as
    zeros. Any other missing tensor, or a missing norm without the flag, raises FuselmError naming the tensor.
    expected_names may be a name -> shape mapping (archs.expected_shapes); otherwise norms are (hidden_size,).
    """
    present = set(present_names)
    shapes = expected_names if isinstance(expected_names, Mapping) else None
    missing = [n for n in expected_names if n not in present]
    fills: dict[str, torch.Tensor] = {}
    for name in missing:
        if not is_norm_weight(name):
            raise FuselmError(f"{source}: tensor {name!r} is missing")
        if not config.flashnorm:
            raise FuselmError(
                f"{source}: norm tensor {name!r} is missing and the checkpoint lacks a flashnorm flag; if its norms "
                f"were folded (FlashNorm), set \"flashnorm\": true in config.json (or the fuselm.flashnorm GGUF key)")
        shape = tuple(shapes[name]) if shapes is not None else (config.hidden_size,)
        fills[name] = (torch.zeros if name.endswith(".bias") else torch.ones)(shape, dtype=dtype)
    return fills
