"""Running GGUF models from their quantized weights: the error against the float model is no worse than llama.cpp's
own on the same file and the same tokens (KL divergence of next-token distributions)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_gguf_format import byte_level_tokenizer, hf_llama, llama_cpp_logits, save_hf

import fuselm
from fuselm.cli import main
from fuselm.quants.embedding import QuantizedEmbedding
from fuselm.quants.kernels import QuantLinear

TYPES = ["Q8_0", "Q4_0", "Q4_K_M", "Q6_K", "Q5_K_M", "Q3_K_M"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qexec")
    tok = byte_level_tokenizer(["<unk>", "<s>", "</s>"], [])
    torch.manual_seed(0)
    # Widths of 256 so every K-quant applies without fallback.
    model = hf_llama(tok.get_vocab_size(), hidden_size=256, intermediate_size=512, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=128)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0 if p.ndim == 2 else 1.0)  # sharper distributions than the 0.02 init, so KL is meaningful
    save_hf(model.eval(), tok, d / "hf", {"bos_token": "<s>", "eos_token": "</s>"})
    for t in TYPES:
        assert main(["quantize", str(d / "hf"), str(d / f"{t}.gguf"), "--type", t]) == 0
    return d


def _kl(ref_logits: np.ndarray, logits: np.ndarray) -> float:
    p = torch.log_softmax(torch.from_numpy(ref_logits).double(), -1)
    q = torch.log_softmax(torch.from_numpy(logits).double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.mark.parametrize("qtype", TYPES)
def test_kl_no_worse_than_llama_cpp(model_dir, qtype):
    import llama_cpp  # noqa: F401  (the reference must be installed)

    ids = torch.randint(3, 200, (48,), generator=torch.Generator().manual_seed(1)).tolist()
    ref = fuselm.load(model_dir / "hf", dtype="float32")(torch.tensor([ids]))[0].numpy()
    model = fuselm.load(model_dir / f"{qtype}.gguf")  # default: quantized weights, bf16 activations
    assert isinstance(model.transformer.layers[0].mlp.down, QuantLinear)
    ours = model(torch.tensor([ids]))[0].numpy()
    theirs = llama_cpp_logits(llama_cpp, model_dir / f"{qtype}.gguf", ids)
    kl_ours, kl_theirs = _kl(ref, ours), _kl(ref, theirs)
    print(f"{qtype}: KL fuselm {kl_ours:.3e}  llama.cpp {kl_theirs:.3e}")
    assert kl_ours <= kl_theirs * 1.05 + 1e-6


@pytest.mark.parametrize("qtype", ["Q4_K_M", "Q8_0"])
def test_quantized_execution_equals_dequantized_dense(model_dir, qtype):
    ids = torch.randint(3, 200, (2, 20), generator=torch.Generator().manual_seed(2))
    fast = fuselm.load(model_dir / f"{qtype}.gguf", dtype="float32")
    dense = fuselm.load(model_dir / f"{qtype}.gguf", dtype="float32", dequantize_all=True)
    assert not isinstance(dense.transformer.layers[0].attn.q, QuantLinear)
    a, b = fast(ids), dense(ids)
    # Prefill runs fp16 weight tiles through a GEMM (see quants/kernels.py for the documented error).
    assert (a - b).abs().max() <= 3e-2 * b.abs().max()


def test_weights_stay_quantized_in_memory(model_dir):
    model = fuselm.load(model_dir / "Q4_K_M.gguf")
    linears = [m for m in model.transformer.modules() if isinstance(m, QuantLinear)]
    assert sum(len(m.parts) for m in linears) == 2 * 7 + 1  # every projection and the output head
    # q/k/v and gate/up of one type run as one stacked matmul
    stacked = [m for m in linears if len(m.parts) > 1]
    assert stacked and all(m.out_features == sum(p.out_features for p in m.parts) for m in stacked)
    float_params = sum(p.numel() for p in model.transformer.parameters())
    assert float_params < 0.01 * sum(m.in_features * m.out_features for m in linears)
    assert isinstance(model.transformer.embed, QuantizedEmbedding) or model.transformer.embed.weight.ndim == 2
