"""Meta's original Chameleon release: the files of one checkpoint read as plain data (the conversion to fuselm's
names is archs/meta.py's and transforms/meta_convert.py's job).

    data/models/7b/{consolidated.pth | consolidated.NN.pth, params.json, consolidate_params.json}
    data/tokenizer/{text_tokenizer.json, vqgan.yaml, vqgan.ckpt}
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .json_file import read_json_object
from .torch_file import load_tensor_dict


def read_consolidated(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """One model-parallel shard (consolidated.pth or consolidated.NN.pth): {Meta name: tensor}, memory-mapped."""
    return load_tensor_dict(path)


def read_vqgan_ckpt(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """tokenizer/vqgan.ckpt (a Lightning checkpoint): the tensors under "state_dict", or the top level."""
    return load_tensor_dict(path, key="state_dict")


def read_params(path: str | os.PathLike) -> dict:
    """params.json / consolidate_params.json / text_tokenizer.json as a JSON object (errors name the file)."""
    return read_json_object(Path(path))
