"""`fuselm flashify | regroup-qknorm | convert`: checkpoint transforms from files to files."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .. import archs
from ..config import ModelConfig
from ..errors import FuselmError
from ..formats import gguf as gguf_format
from ..formats import hf as hf_format
from ..sources import ModelSource, read_source

RAW = argparse.RawDescriptionHelpFormatter


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
        gguf_format.write_gguf(out, config, tensors, tokenizer=source.tokenizer, chat_template=source.chat_template)
        if source.vqgan is not None:
            gguf_format.write_vqgan_gguf(gguf_format.companion_path(out), *source.vqgan)
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
    import json

    from ..formats.gguf_vocab import tokenizer_config_from_gguf, tokenizer_from_gguf

    backend = tokenizer_from_gguf(source.tokenizer, source=str(source.path))
    return {"tokenizer.json": backend.to_str(),
            "tokenizer_config.json": json.dumps(tokenizer_config_from_gguf(source.tokenizer), indent=2)}


def _default_format(out: str) -> str:
    return "gguf" if out.endswith(".gguf") else "hf"


def cmd_flashify(args) -> int:
    from ..transforms.flashnorm import flashify

    source = read_source(args.src)
    config, state, report = flashify(source.config, source.state, strict=args.strict)
    for line in report:
        print(line, file=sys.stderr)
    out = write_model(Path(args.out), args.format or _default_format(args.out), config, state, source)
    print(f"wrote {out} ({'strict' if args.strict else 'compat'} mode)")
    return 0


def cmd_regroup(args) -> int:
    from ..transforms.qknorm import expand_qknorm, qknorm_max_deviation, regroup_qknorm

    source = read_source(args.src)
    if not source.config.qk_norm:
        raise FuselmError(f"{args.src}: this {source.config.arch} model has no qk-norm to regroup")
    if args.groups == "per-head":
        state = expand_qknorm(source.config, source.state)
    else:
        try:
            groups = int(args.groups)
        except ValueError:
            raise FuselmError(f"--groups must be a positive integer or 'per-head', got {args.groups!r}") from None
        if args.average:
            dev = qknorm_max_deviation(source.config, source.state, groups)
            print(f"averaging heads within groups (max deviation {dev:.3g})", file=sys.stderr)
        state = regroup_qknorm(source.config, source.state, groups, average=args.average)
    out = write_model(Path(args.out), args.format or _default_format(args.out), source.config, state, source)
    print(f"wrote {out}")
    return 0


def cmd_convert(args) -> int:
    from ..transforms.meta_convert import convert_meta

    conv = convert_meta(args.meta_dir, qk_norm=args.qk_norm)
    for line in conv.report:
        print(line, file=sys.stderr)
    from tokenizers import Tokenizer as HFTokenizer

    tokenizer = HFTokenizer.from_str(json.dumps(conv.tokenizer_json)) if conv.tokenizer_json else None
    vq = None
    if conv.vqgan_state_dict:
        vq_state = {k[len("model.vqmodel."):]: v for k, v in conv.vqgan_state_dict.items()}
        vq = (conv.config.extra.get("vq_config") or {}, vq_state)
    source = ModelSource(Path(args.meta_dir), "meta", conv.config, conv.state_dict, tokenizer, None, vq)
    extra = {}
    if conv.tokenizer_json:
        extra["tokenizer.json"] = json.dumps(conv.tokenizer_json)
        extra["tokenizer_config.json"] = json.dumps(conv.tokenizer_config or {})
    out = write_model(Path(args.out), args.format or _default_format(args.out), conv.config, conv.state_dict, source,
                      extra_files=extra)
    print(f"wrote {out}")
    return 0


def register(sub) -> None:
    from ..transforms.flashnorm import HELP_FLASHIFY, HELP_FLASHIFY_STRICT
    from ..transforms.meta_convert import HELP_CONVERT, HELP_CONVERT_QK_NORM
    from ..transforms.qknorm import HELP_REGROUP_AVERAGE, HELP_REGROUP_GROUPS, HELP_REGROUP_QKNORM

    fmt_help = "output format: hf (a directory) or gguf (default: gguf when OUT ends in .gguf, else hf)"
    p = sub.add_parser("flashify", help="fold norm weights into the following linears (FlashNorm)",
                       description=HELP_FLASHIFY, formatter_class=RAW)
    p.add_argument("src", help="HF directory or .gguf")
    p.add_argument("out", help="output directory (hf) or .gguf file")
    p.add_argument("--strict", action="store_true", help=HELP_FLASHIFY_STRICT)
    p.add_argument("--format", choices=["hf", "gguf"], default=None, help=fmt_help)
    p.set_defaults(func=cmd_flashify)

    p = sub.add_parser("regroup-qknorm", help="convert Chameleon qk-norm weights between per-head and grouped",
                       description=HELP_REGROUP_QKNORM, formatter_class=RAW)
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--groups", required=True, help=HELP_REGROUP_GROUPS)
    p.add_argument("--average", action="store_true", help=HELP_REGROUP_AVERAGE)
    p.add_argument("--format", choices=["hf", "gguf"], default=None, help=fmt_help)
    p.set_defaults(func=cmd_regroup)

    p = sub.add_parser("convert", help="convert Meta's original Chameleon release to an HF directory",
                       description=HELP_CONVERT, formatter_class=RAW)
    p.add_argument("meta_dir", help="Meta checkpoint directory (params.json + consolidated*.pth)")
    p.add_argument("out")
    p.add_argument("--qk-norm", choices=["per-head", "grouped"], default="per-head", help=HELP_CONVERT_QK_NORM)
    p.add_argument("--format", choices=["hf", "gguf"], default=None, help=fmt_help)
    p.set_defaults(func=cmd_convert)
