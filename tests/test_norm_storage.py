"""Norm weights and biases may be stored as F32, F16 or BF16 in a GGUF: tensors are recognized by name and role,
never by rank and dtype (a 2-D F16 qk-norm bias is not a linear weight)."""

from __future__ import annotations

import re

import pytest
import tiny_hf
import torch
from safetensors.torch import load_file

import fuselm
from fuselm import archs

NORMS = re.compile(r".*(norm)\.(weight|bias)$")
ROUND = {"F16": torch.float16, "BF16": torch.bfloat16}


@pytest.fixture(scope="module")
def chameleon(tmp_path_factory):
    d = tiny_hf.make_chameleon(tmp_path_factory.mktemp("cham"))
    config = archs.config_from_hf(__import__("json").loads((d / "config.json").read_text()))
    state = archs.hf_to_internal(config, load_file(str(d / "model.safetensors")))
    return config, archs.internal_to_gguf(config, state)


@pytest.mark.parametrize("storage", ["F16", "BF16"])
def test_16bit_norms_and_biases_give_the_logits_of_f32_storage(chameleon, storage, tmp_path):
    config, tensors = chameleon
    norms = [n for n in tensors if NORMS.fullmatch(n)]
    assert any("attn_q_norm.bias" in n for n in norms) and tensors[norms[0]].ndim >= 1
    stored = {n: (t, storage if n in norms else "F32") for n, t in tensors.items()}
    rounded = {n: (t.to(ROUND[storage]).float() if n in norms else t, "F32") for n, t in tensors.items()}
    archs.write_gguf(tmp_path / "s.gguf", config, stored, progress=False)
    archs.write_gguf(tmp_path / "r.gguf", config, rounded, progress=False)
    ids = torch.randint(0, tiny_hf.VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    a = fuselm.load(tmp_path / "s.gguf")
    b = fuselm.load(tmp_path / "r.gguf")
    assert a.transformer.layers[0].attn.q_norm.bias.shape == (config.num_attention_heads, config.head_dim)
    torch.testing.assert_close(a(ids), b(ids), rtol=0, atol=1e-6)
