"""HF tokenizers (tokenizer.json) <-> GGUF `tokenizer.ggml.*` metadata, as llama.cpp writes and reads them.

Two llama.cpp tokenizer models cover our archs:
- "gpt2": byte-level BPE (tokens, token_type, merges "a b", and `tokenizer.ggml.pre` naming the pre-tokenizer
  regexes that llama.cpp hard-codes per name in src/llama-vocab.cpp). Llama-3, Falcon and Chameleon use it.
- "llama": SentencePiece-style BPE with byte fallback (tokens, scores, token_type; ▁ for spaces). Llama-1/2 use it.

Writing follows convert_hf_to_gguf.py (get_vocab_base / LlamaHfVocab) with one deliberate difference: for a
SentencePiece-style tokenizer.json the converter writes every score as -1000, which leaves llama.cpp's SPM tokenizer
(it merges the highest-scoring pair first) without an order; we write score = -(rank of the first merge that
produces the token), so llama.cpp merges in the tokenizer's own order.

Reading rebuilds a `tokenizers.Tokenizer`: for "gpt2" BPE with llama.cpp's regexes for the `pre` name as HF Split
pre-tokenizers (each splits the previous pieces, keeping matches and gaps: behavior "isolated") and a byte-level
alphabet; for "llama" BPE whose merges come from the scores the way transformers' SentencePiece converter derives
them, with byte fallback and the ▁ metaspace.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import gguf
import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from ..errors import FuselmError
from .values import check_value

K = gguf.Keys.Tokenizer
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = (int(t) for t in (
    gguf.TokenType.NORMAL, gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED,
    gguf.TokenType.UNUSED, gguf.TokenType.BYTE))
SPACE = "\u2581"  # ▁, SentencePiece's space

# ---------------------------------------------------------------- llama.cpp's pre-tokenizers (llama-vocab.cpp, V)

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_GROUPS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("default",), (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")),
    (("gpt-2", "mpt", "olmo", "phi-2", "jina-es", "jina-de", "jina-v2-es", "jina-v2-de", "gigachat", "a.x-4.0",
      "mellum", "trillion", "granite-docling", "exaone4", "jais"), (_GPT2,)),
    (("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "dbrx",
      "smaug-bpe", "chatglm-bpe"), (_LLAMA3,)),
    (("qwen2", "deepseek-r1-qwen", "stablelm2", "hunyuan", "megrez", "kormo"), (_QWEN2,)),
    (("qwen35",), (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
                   r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",)),
    (("falcon",), (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]")),
    (("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"), (r"\p{N}", _GPT2)),
    (("poro-chat", "bloom", "gpt3-finnish"), (r" ?[^(\s|.,!?…。，、।۔،)]+",)),
    (("deepseek-coder",), (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[一-龥ࠀ-一가-퟿]+", r"\p{N}")),
    (("chameleon",), (r"<sentinel:[0-9]+>", r"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z", r"([\t\n]|    |  )", r"\p{N}",
                      r"[\p{P}!-/:-@\[-`{-~]", _GPT2)),
)
PRE_TOKENIZER_REGEXES: dict[str, tuple[str, ...]] = {name: rx for names, rx in _PRE_GROUPS for name in names}
# llama.cpp matches whole words against the vocabulary before merging for these (ignore_merges), and adds BOS.
_IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"}
_ADD_BOS_DEFAULT = _IGNORE_MERGES | {"chameleon"}


# ---------------------------------------------------------------- tokenizer.json -> GGUF

def _looks_special(token: str) -> bool:
    """convert_hf_to_gguf.py's does_token_look_special: added tokens that act as control tokens."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _flatten(node: dict | None, list_key: str) -> list[dict]:
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [leaf for child in node.get(list_key, []) for leaf in _flatten(child, list_key)]
    return [node]


def _split_pattern(node: dict) -> str | None:
    pattern = node.get("pattern") or {}
    return pattern.get("Regex", pattern.get("String"))


_LLAMA3_HF = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_HF = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def detect_pre_tokenizer(spec: Mapping) -> str | None:
    """llama.cpp's `tokenizer.ggml.pre` name for a tokenizer.json's pre-tokenizer, when it is one we recognize.

    convert_hf_to_gguf.py identifies pre-tokenizers by hashing the token ids of a probe text, which only works for
    published tokenizers; this looks at the pre-tokenizer's structure instead.
    """
    leaves = _flatten(spec.get("pre_tokenizer"), "pretokenizers")
    kinds = [leaf.get("type") for leaf in leaves]
    splits = [_split_pattern(leaf) for leaf in leaves if leaf.get("type") == "Split"]
    byte_level = [leaf for leaf in leaves if leaf.get("type") == "ByteLevel"]
    if kinds == ["ByteLevel"] and byte_level[0].get("use_regex", True):
        return "gpt-2"
    if any(s and s.startswith("<sentinel:") for s in splits):
        return "chameleon"
    if kinds == ["Split", "ByteLevel"] and not byte_level[0].get("use_regex", True):
        return {_LLAMA3_HF: "llama-bpe", _LLAMA3: "llama-bpe", _QWEN2_HF: "qwen2", _QWEN2: "qwen2"}.get(splits[0])
    if kinds == ["Punctuation", "ByteLevel", "Digits", "Split"] and splits == ["[0-9][0-9][0-9]"]:
        return "falcon"
    if kinds == ["Digits", "ByteLevel"] and leaves[0].get("individual_digits"):
        return "starcoder"
    return None


def _merge_strings(merges: list) -> list[str]:
    """tokenizer.json merges (strings "a b" or pairs [a, b]) -> GGUF strings "a b", spaces inside parts as U+0120."""
    out = []
    for m in merges:
        if isinstance(m, str):
            out.append(m)
        else:
            out.append(" ".join(part.replace(" ", "\u0120") for part in m))
    return out


def _is_spm_style(spec: Mapping) -> bool:
    """LlamaHfVocab's test: BPE with byte fallback and a Sequence decoder (▁ replace, byte fallback, fuse, strip)."""
    model = spec.get("model") or {}
    return bool(model.get("byte_fallback")) and (spec.get("decoder") or {}).get("type") == "Sequence"


def _adds_special(spec: Mapping) -> tuple[bool | None, bool | None]:
    """(add_bos, add_eos) from the post-processor, as gguf.SpecialVocab reads it; None where it says nothing."""
    add_bos = add_eos = None
    for proc in _flatten(spec.get("post_processor"), "processors"):
        if proc.get("type") == "ByteLevel":
            add_bos = False if add_bos is None else add_bos
            add_eos = False if add_eos is None else add_eos
        elif proc.get("type") == "TemplateProcessing":
            single = proc.get("single") or []
            add_bos = bool(single) and "SpecialToken" in single[0]
            add_eos = len(single) > 1 and "SpecialToken" in single[-1]
    return add_bos, add_eos


def _spm_scores(vocab: Mapping[str, int], merges: list[str]) -> dict[int, float]:
    """Score = -(rank of the first merge producing the token): llama.cpp's SPM merge order = the BPE merge order."""
    scores: dict[int, float] = {}
    for rank, merge in enumerate(merges):
        i = merge.find(" ", 1)
        token_id = vocab.get(merge[:i] + merge[i + 1:])
        if token_id is not None and token_id not in scores:
            scores[token_id] = -float(rank)
    return scores


def tokenizer_to_gguf(tokenizer: Tokenizer, vocab_size: int, *, pre: str | None = None) -> dict[str, Any]:
    """`tokenizer.ggml.*` metadata for a BPE `tokenizers.Tokenizer`, padded with [PAD{i}] to the model's vocab_size.

    `pre` overrides the detected pre-tokenizer name (see PRE_TOKENIZER_REGEXES). Special token ids (bos, eos, pad)
    come from the model config (archs.config_to_gguf_metadata); this adds the unknown token when the model has one.
    """
    spec = json.loads(tokenizer.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise FuselmError(f"tokenizer: model type {model.get('type')!r} cannot be written to GGUF; expected BPE "
                          "(byte-level like GPT-2/Llama-3, or SentencePiece-style with byte fallback like Llama-2)")
    vocab: dict[str, int] = model["vocab"]
    added = {int(a["id"]): a for a in spec.get("added_tokens") or []}
    id_to_token = {i: t for t, i in vocab.items()}
    id_to_token.update({i: a["content"] for i, a in added.items()})
    top = max(id_to_token, default=-1)
    if top >= vocab_size:
        raise FuselmError(f"tokenizer: token id {top} ({id_to_token[top]!r}) does not fit the model's vocab_size "
                          f"{vocab_size}")
    merges = _merge_strings(model.get("merges") or [])
    spm = _is_spm_style(spec)
    if pre is None:
        pre = "default" if spm else detect_pre_tokenizer(spec)
    if pre is None:
        raise FuselmError("tokenizer: its pre-tokenizer is not one llama.cpp knows by structure; pass pre=NAME with "
                          f"one of {', '.join(sorted(PRE_TOKENIZER_REGEXES))}")
    if pre not in PRE_TOKENIZER_REGEXES:
        raise FuselmError(f"tokenizer: pre-tokenizer {pre!r} is unknown; expected one of "
                          f"{', '.join(sorted(PRE_TOKENIZER_REGEXES))}")
    unk_id = vocab.get(model["unk_token"]) if model.get("unk_token") else None
    scores = _spm_scores(vocab, merges) if spm else {}
    tokens, types, score_list = [], np.empty(vocab_size, np.int32), np.zeros(vocab_size, np.float32)
    for i in range(vocab_size):
        token = id_to_token.get(i)
        if token is None:
            token, kind, score = f"[PAD{i}]", UNUSED, -1000.0
        elif i in added and i != unk_id:
            special = added[i].get("special") or _looks_special(token)
            kind, score = (CONTROL, 0.0) if special else (USER_DEFINED, -1000.0)
            if not special:
                token = token.replace(SPACE, " ")  # llama.cpp expects user-defined tokens pre-normalized
        elif i == unk_id:
            kind, score = UNKNOWN, 0.0
        elif spm and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            kind, score = BYTE, 0.0
        else:
            # Tokens no merge produces (the base alphabet) rank after every merge.
            kind, score = NORMAL, scores.get(i, -float(len(merges) + i))
        tokens.append(token)
        types[i], score_list[i] = kind, score
    out: dict[str, Any] = {K.MODEL: "llama" if spm else "gpt2", K.PRE: pre, K.LIST: tokens, K.TOKEN_TYPE: types}
    if spm:
        out[K.SCORES] = score_list
        if not _prepends_space(spec):
            out[K.ADD_PREFIX] = False
    else:  # required by llama.cpp and by tokenizer_from_gguf, so written (as a typed empty array) even when empty
        out[K.MERGES] = merges if merges else np.array([], dtype=np.str_)
    if unk_id is not None:
        out[K.UNK_ID] = int(unk_id)
    add_bos, add_eos = _adds_special(spec)
    if add_bos is not None:
        out[K.ADD_BOS] = add_bos
    if add_eos is not None:
        out[K.ADD_EOS] = add_eos
    return out


def _prepends_space(spec: Mapping) -> bool:
    normalizers = _flatten(spec.get("normalizer"), "normalizers")
    if any(n.get("type") == "Prepend" and n.get("prepend") == SPACE for n in normalizers):
        return True
    return any(p.get("type") == "Metaspace" and p.get("prepend_scheme", "always") != "never"
               for p in _flatten(spec.get("pre_tokenizer"), "pretokenizers"))


# ---------------------------------------------------------------- GGUF -> tokenizers.Tokenizer

def _require(metadata: Mapping, key: str, source: str):
    if metadata.get(key) is None:
        raise FuselmError(f"{source}: missing required GGUF key {key!r}")
    return metadata[key]


def _string_list(metadata: Mapping, key: str, source: str) -> list[str]:
    value = _require(metadata, key, source)
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise FuselmError(f"{source}: key {key!r} must be an array of strings, got {_kind(value)}")
    for i, t in enumerate(value):
        if not t.isascii():
            try:
                t.encode("utf-8")
            except UnicodeEncodeError:
                raise FuselmError(f"{source}: key {key!r} entry {i} is not valid UTF-8 ({t!r})") from None
    return value


def _number_array(metadata: Mapping, key: str, n: int, kind: str, source: str) -> np.ndarray | None:
    value = metadata.get(key)
    if value is None:
        return None
    want = np.integer if kind == "int" else np.number
    if not isinstance(value, np.ndarray) or not np.issubdtype(value.dtype, want) or value.ndim != 1:
        raise FuselmError(f"{source}: key {key!r} must be an array of {kind}s, got {_kind(value)}")
    if len(value) != n:
        raise FuselmError(f"{source}: key {key!r} has {len(value)} entries for {n} tokens")
    if kind == "float" and not np.isfinite(value).all():
        raise FuselmError(f"{source}: key {key!r} holds values that are not finite numbers")
    return value


def _token_id(metadata: Mapping, key: str, n: int, source: str, *, required_in_range: bool = True) -> int | None:
    value = metadata.get(key)
    if value is None:
        return None
    value = check_value(value, "int", f"{source}: key {key!r}")
    if not 0 <= value < n:
        if not required_in_range:
            return None
        raise FuselmError(f"{source}: key {key!r} is {value}, outside the {n}-token vocabulary")
    return value


def _flag(metadata: Mapping, key: str, default: bool, source: str) -> bool:
    value = metadata.get(key)
    return default if value is None else check_value(value, "bool", f"{source}: key {key!r}")


def _text(metadata: Mapping, key: str, source: str, default: str | None = None) -> str | None:
    value = metadata.get(key)
    return default if value is None else check_value(value, "str", f"{source}: key {key!r}")


def _kind(value) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of {value.dtype}"
    if isinstance(value, list):
        kinds = sorted({type(v).__name__ for v in value[:1000]})
        return f"an array of {'/'.join(kinds) or 'nothing'}"
    return f"a {type(value).__name__}"


def tokenizer_from_gguf(metadata: Mapping[str, Any], source: str = "gguf") -> Tokenizer:
    """Rebuild a `tokenizers.Tokenizer` (encode/decode) from `tokenizer.ggml.*` metadata (gpt2 or llama models).
    Every key is type-checked first; a wrong one raises FuselmError naming `source` and the key."""
    kind = _text(metadata, K.MODEL, source)
    if kind is None:
        raise FuselmError(f"{source}: missing required GGUF key {K.MODEL!r}")
    tokens = _string_list(metadata, K.LIST, source)
    types = _number_array(metadata, K.TOKEN_TYPE, len(tokens), "int", source)
    types = np.full(len(tokens), NORMAL, np.int64) if types is None else types.astype(np.int64)
    vocab = {t: i for i, t in enumerate(tokens)}  # llama.cpp: a repeated string maps to its last id
    if kind == "gpt2":
        tok = _byte_level_bpe(metadata, tokens, vocab, source)
    elif kind == "llama":
        tok = _sentencepiece_bpe(metadata, tokens, types, vocab, source)
    else:
        raise FuselmError(f"{source}: key {K.MODEL!r} is {kind!r}; fuselm reads 'gpt2' and 'llama' tokenizers")
    control = [AddedToken(tokens[i], special=True, normalized=False) for i in np.flatnonzero(types == CONTROL)]
    user = [AddedToken(tokens[i], special=False, normalized=False) for i in np.flatnonzero(types == USER_DEFINED)]
    tok.add_special_tokens(control)
    tok.add_tokens(user)
    tok.post_processor = _post_processor(metadata, tokens, kind, source)
    return tok


def tokenizer_config_from_gguf(metadata: Mapping[str, Any], source: str = "gguf") -> dict[str, Any]:
    """tokenizer_config.json's fields from `tokenizer.*` metadata: bos/eos token strings, add_bos_token and the
    chat template when there is one (token ids out of range give None; wrongly typed keys raise)."""
    tokens = _string_list(metadata, K.LIST, source) if metadata.get(K.LIST) is not None else []

    def name(key: str) -> str | None:
        i = _token_id(metadata, key, len(tokens), source, required_in_range=False)
        return None if i is None else tokens[i]

    config = {"bos_token": name(K.BOS_ID), "eos_token": name(K.EOS_ID),
              "add_bos_token": _flag(metadata, K.ADD_BOS, False, source)}
    template = _text(metadata, K.CHAT_TEMPLATE, source)
    if template:
        config["chat_template"] = template
    return config


def _byte_level_bpe(metadata: Mapping, tokens: list[str], vocab: dict[str, int], source: str) -> Tokenizer:
    pre = _text(metadata, K.PRE, source) or "default"
    if pre not in PRE_TOKENIZER_REGEXES:
        raise FuselmError(f"{source}: pre-tokenizer {pre!r} (key {K.PRE!r}) is not supported; fuselm knows "
                          f"{', '.join(sorted(PRE_TOKENIZER_REGEXES))}")
    merges = []
    for m in _string_list(metadata, K.MERGES, source):
        i = m.find(" ", 1)  # llama.cpp splits at the first space after the first character
        if i < 0:
            raise FuselmError(f"{source}: merge {m!r} in {K.MERGES!r} has no space")
        merges.append((m[:i], m[i + 1:]))
    try:
        model = BPE(vocab=vocab, merges=merges, ignore_merges=pre in _IGNORE_MERGES)
    except Exception as err:  # tokenizers raises a bare Exception for merges outside the vocabulary
        raise FuselmError(f"{source}: {K.MERGES!r} do not fit {K.LIST!r} ({err})") from None
    tok = Tokenizer(model)
    splits = [pre_tokenizers.Split(Regex(rx), behavior="isolated") for rx in PRE_TOKENIZER_REGEXES[pre]]
    tok.pre_tokenizer = pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                    use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def spm_merges(vocab: Mapping[str, int], scores: np.ndarray) -> list[tuple[str, str]]:
    """Merges of a SentencePiece BPE vocabulary (piece -> id, scores by id), as transformers derives them: every
    split of a piece into two pieces, highest-scoring result first (ties: longer left part, longer right part, then
    piece id order)."""
    candidates = []
    for piece, i in sorted(vocab.items(), key=lambda kv: kv[1]):
        local = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        candidates.extend((float(scores[i]), len(left), len(right), left, right) for left, right in local)
    candidates.sort(key=lambda c: (c[0], c[1], c[2]), reverse=True)
    return [(c[3], c[4]) for c in candidates]


def _sentencepiece_bpe(metadata: Mapping, tokens: list[str], types: np.ndarray, vocab: dict[str, int],
                       source: str) -> Tokenizer:
    _require(metadata, K.SCORES, source)
    scores = _number_array(metadata, K.SCORES, len(tokens), "float", source).astype(np.float32)
    unk_id = _token_id(metadata, K.UNK_ID, len(tokens), source)
    if unk_id is None and (types == UNKNOWN).any():
        unk_id = int(np.flatnonzero(types == UNKNOWN)[0])
    unk = tokens[unk_id] if unk_id is not None else None
    # Only ordinary pieces merge; control, byte and unused entries are reached by id, byte fallback or not at all.
    mergeable = {t: i for t, i in vocab.items() if types[i] in (NORMAL, USER_DEFINED)}
    model = BPE(vocab=vocab, merges=spm_merges(mergeable, scores), unk_token=unk, fuse_unk=True, byte_fallback=True)
    tok = Tokenizer(model)
    prefix = _flag(metadata, K.ADD_PREFIX, True, source)
    # SentencePiece's dummy prefix: always one ▁ in front (even before a leading space), as llama.cpp does.
    tok.normalizer = normalizers.Sequence([*([normalizers.Prepend(SPACE)] if prefix else []),
                                           normalizers.Replace(" ", SPACE)])
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok


def _post_processor(metadata: Mapping, tokens: list[str], kind: str, source: str):
    """Prepend BOS / append EOS as llama.cpp does by default for this tokenizer (or as the file says)."""
    pre = _text(metadata, K.PRE, source) or "default"
    add_bos = _flag(metadata, K.ADD_BOS, kind == "llama" or pre in _ADD_BOS_DEFAULT, source)
    add_eos = _flag(metadata, K.ADD_EOS, False, source)
    single, specials = ["$A:0"], []
    for flag, key, at_start in ((add_bos, K.BOS_ID, True), (add_eos, K.EOS_ID, False)):
        token_id = _token_id(metadata, key, len(tokens), source) if flag else None
        if token_id is None:
            continue
        text = tokens[token_id]
        single = [f"{text}:0", *single] if at_start else [*single, f"{text}:0"]
        specials.append((text, token_id))
    if not specials:
        return None
    pair = [*single, *(s.replace("$A", "$B").replace(":0", ":1") for s in single)]
    return processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair), special_tokens=specials)
