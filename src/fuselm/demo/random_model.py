"""A tiny Chameleon with random weights, written in the real HF format (config.json, safetensors, tokenizer.json).

Used by the plumbing demo and by tests that need a complete model directory without transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from ..archs import config_to_hf, internal_to_hf
from ..config import ModelConfig
from ..formats.hf import write_hf_dir
from ..model.transformer import Transformer
from ..vision.vocab import image_token_name

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]
CHAMELEON_SPECIALS = ["<eoss>", "<racm3:break>", "<reserved08706>"]


def build_tokenizer(texts: list[str], image_tokens: int, vocab_size: int = 256) -> Tokenizer:
    """BPE over the texts; ids 0-3 specials, then image tokens (IMGIMG..Z) from id 4, as in Chameleon."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    from tokenizers import decoders

    tok.decoder = decoders.Metaspace()
    reserved = SPECIALS + [image_token_name(i) for i in range(image_tokens)] + CHAMELEON_SPECIALS
    trainer = trainers.BpeTrainer(vocab_size=vocab_size + len(reserved), special_tokens=reserved,
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def build_random_chameleon(directory: Path, seed: int = 0, image_tokens: int = 64) -> Path:
    from .world import all_scenes, caption

    torch.manual_seed(seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer([caption(s) for s in all_scenes()], image_tokens)
    vocab = tok.get_vocab()
    config = ModelConfig(arch="chameleon", vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                         max_position_embeddings=512, qk_norm=True, bos_token_id=0, eos_token_ids=(2,),
                         extra={"vocabulary_map": vocab})
    model = Transformer(config)
    for p in model.parameters():  # nn.Linear init is fine; make the embeddings non-trivial too
        if p.ndim == 2:
            torch.nn.init.normal_(p, std=0.05)
    state = internal_to_hf(config, model.state_dict())
    write_hf_dir(directory, config_to_hf(config), state)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                                 "add_bos_token": True}))
    return directory
