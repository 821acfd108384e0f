"""Tiny random HF models (transformers is the reference), saved with save_pretrained."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 128


def chameleon_vocabulary_map(vocab: int = VOCAB, image_tokens: int = 16) -> dict[str, int]:
    """A tiny Chameleon-style vocab: specials, IMGIMG<letters>Z image tokens from id 4, then text tokens."""
    def img_name(i: int) -> str:
        return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(i)) + "Z"

    names = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for i in range(image_tokens):
        names[img_name(i)] = 4 + i
    nxt = 4 + image_tokens
    for special in ("<eoss>", "<racm3:break>", "<image>", "<reserved08706>"):
        names[special] = nxt
        nxt += 1
    for i in range(nxt, vocab):
        names[f"t{i}"] = i
    return names


def make_llama(tmp: Path, *, tie: bool = False, kv_heads: int = 2, seed: int = 0, **overrides) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    settings = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=256,
                    tie_word_embeddings=tie, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    cfg = LlamaConfig(**{**settings, **overrides})
    model = LlamaForCausalLM(cfg).eval()
    _randomize_norms(model)
    model.save_pretrained(tmp)
    return tmp


def make_chameleon(tmp: Path, *, swin: bool = False, seed: int = 0, **overrides) -> Path:
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    torch.manual_seed(seed)
    sizes = {**dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2), **overrides}
    cfg = ChameleonConfig(vocab_size=VOCAB, max_position_embeddings=256, **sizes, swin_norm=swin,
                          vocabulary_map=chameleon_vocabulary_map(),
                          vq_config={"embed_dim": 8, "num_embeddings": 16, "base_channels": 32,
                                     "channel_multiplier": [1, 1], "resolution": 16, "latent_channels": 8,
                                     "num_res_blocks": 1, "attn_resolutions": []})
    model = ChameleonForConditionalGeneration(cfg).eval()
    _randomize_norms(model)
    model.save_pretrained(tmp)
    return tmp


def make_falcon(tmp: Path, *, new_arch: bool = False, seed: int = 0, bias: bool = False) -> Path:
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(seed)
    kwargs = dict(new_decoder_architecture=True, num_kv_heads=2) if new_arch else dict(multi_query=True)
    cfg = FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       parallel_attn=True, bias=bias, alibi=False, max_position_embeddings=256,
                       bos_token_id=1, eos_token_id=2, **kwargs)
    model = FalconForCausalLM(cfg).eval()
    _randomize_norms(model)
    model.save_pretrained(tmp)
    return tmp


def make_qwen2(tmp: Path, *, tie: bool = False, seed: int = 0, **overrides) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    settings = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    tie_word_embeddings=tie, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, rope_theta=10000.0)
    model = Qwen2ForCausalLM(Qwen2Config(**{**settings, **overrides})).eval()
    _randomize_norms(model)
    _randomize_biases(model)
    model.save_pretrained(tmp)
    return tmp


def make_mistral(tmp: Path, *, window: int | None = 8, seed: int = 0, **overrides) -> Path:
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    settings = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, sliding_window=window)
    model = MistralForCausalLM(MistralConfig(**{**settings, **overrides})).eval()
    _randomize_norms(model)
    model.save_pretrained(tmp)
    return tmp


def _randomize_biases(model: torch.nn.Module) -> None:
    """Zero-initialised biases would hide a bias that is dropped or misplaced."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))


def _randomize_norms(model: torch.nn.Module) -> None:
    """Random init leaves norms at ones/zeros, which would hide mistakes in how they are applied."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                if name.endswith("weight"):
                    p.copy_(1 + 0.2 * torch.randn_like(p))
                else:
                    p.copy_(0.1 * torch.randn_like(p))


def hf_logits(directory: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import (
        AutoConfig,
        ChameleonForConditionalGeneration,
        FalconForCausalLM,
        LlamaForCausalLM,
        MistralForCausalLM,
        Qwen2ForCausalLM,
    )

    kind = AutoConfig.from_pretrained(directory).model_type
    cls = {"llama": LlamaForCausalLM, "chameleon": ChameleonForConditionalGeneration,
           "falcon": FalconForCausalLM, "qwen2": Qwen2ForCausalLM, "mistral": MistralForCausalLM}[kind]
    model = cls.from_pretrained(directory, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits.float()
