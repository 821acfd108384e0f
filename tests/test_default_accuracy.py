"""The default compute is as accurate as llama.cpp's: on F16, Q8_0 and Q4_K_M GGUFs made by llama.cpp (its converter
and its quantizer), fuselm's default logits are at least as close to fuselm's own float32 computation on the same
weights (every weight dequantized, float32 throughout) as llama.cpp's logits are."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from llama_quantize_ref import llama_quantize
from test_gguf_format import (
    _randomize,
    hf_llama,
    llama_cpp_logits,
    save_hf,
    spm_style_tokenizer,
)
from test_new_archs import _convert

import fuselm


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("acc")
    tok = spm_style_tokenizer()
    torch.manual_seed(0)
    # Widths of 256 so the K-quants apply without fallback; llama.cpp's F16 file is the source of the others.
    model = hf_llama(tok.get_vocab_size(), hidden_size=256, intermediate_size=512, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=128).eval()
    _randomize(model, seed=3)
    save_hf(model, tok, d / "hf", {"bos_token": "<s>", "eos_token": "</s>"})
    out = {"F16": d / "f16.gguf"}
    _convert(d / "hf", out["F16"])
    for ftype in ("Q8_0", "Q4_K_M"):
        out[ftype] = d / f"{ftype}.gguf"
        llama_quantize(out["F16"], out[ftype], ftype)
    return out


def _rel_rms(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.sqrt(np.mean((x - ref) ** 2)) / np.sqrt(np.mean(ref ** 2)))


@pytest.mark.parametrize("ftype", ["F16", "Q8_0", "Q4_K_M"])
def test_default_logits_at_least_as_close_as_llama_cpp(files, ftype):
    import llama_cpp

    path = files[ftype]
    ids = torch.randint(3, 300, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    reference = fuselm.load(path, dtype="float32", dequantize_all=True)(torch.tensor([ids]))[0].numpy()
    default = fuselm.load(path)
    assert default.transformer.dtype == torch.float32  # the default accuracy mode
    ours = default(torch.tensor([ids]))[0].numpy()
    theirs = llama_cpp_logits(llama_cpp, path, ids)
    e_ours, e_theirs = _rel_rms(ours, reference), _rel_rms(theirs, reference)
    print(f"{ftype}: relative RMS to float32, fuselm default {e_ours:.2e}, llama.cpp {e_theirs:.2e}")
    assert e_ours <= e_theirs, f"{ftype}: fuselm {e_ours:.3g} > llama.cpp {e_theirs:.3g}"
    # ... and in decode, where one row goes through the GEMV (16-bit activations for quantized weights)
    step = list(decode_logits(default, ids))
    e_step = _rel_rms(np.stack(step), reference[-len(step):])
    print(f"{ftype}: decode steps, fuselm default {e_step:.2e}")
    assert e_step <= e_theirs


def decode_logits(model, ids: list[int], steps: int = 8):
    """Logits of the last `steps` positions, each computed as a one-token decode step over the cache."""
    from fuselm.generation.decoder import Decoder

    decoder = Decoder(model.transformer, 1, len(ids))
    row = decoder.take_row(ids[:-steps])
    decoder.feed([row])
    for token in ids[-steps:]:
        decoder.push([row], [token])
        yield decoder.feed([row])[row].numpy()
