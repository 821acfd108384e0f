"""Peak RSS while loading a bf16 HF checkpoint: fuselm vs transformers, as a ratio of the weight bytes.

    python benchmarks/load_rss.py [--layers 12] [--hidden 2048]

Each load runs in a fresh subprocess; the figure is (peak RSS after load - RSS after imports) / weight bytes,
after one forward pass so that every weight page has really been touched.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

PROBE = r"""
import json, resource, sys, torch
def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
kind, path = sys.argv[1], sys.argv[2]
if kind == "fuselm":
    import fuselm
else:
    import transformers
base = rss_mb()
tokens = torch.tensor([[1, 2, 3, 4]])
if kind == "fuselm":
    model = fuselm.load(path)
    model(tokens)
else:
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16)
    with torch.no_grad():
        model(tokens)
print(json.dumps({"base_mb": base, "peak_mb": rss_mb()}))
"""


def make_checkpoint(directory: Path, layers: int, hidden: int) -> int:
    import torch

    from fuselm.archs import config_to_hf, internal_to_hf
    from fuselm.config import ModelConfig
    from fuselm.formats.hf import write_hf_dir
    from fuselm.model.transformer import Transformer

    config = ModelConfig(arch="llama", vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256,
                         head_dim=64, max_position_embeddings=2048)
    with torch.device("meta"):
        model = Transformer(config)
    state = {k: torch.randn(v.shape, dtype=torch.bfloat16) * 0.02 for k, v in model.state_dict().items()}
    write_hf_dir(directory, {**config_to_hf(config), "torch_dtype": "bfloat16"}, internal_to_hf(config, state))
    return sum(t.numel() * 2 for t in state.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=2048)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        weight_bytes = make_checkpoint(Path(tmp), args.layers, args.hidden)
        print(f"checkpoint: {weight_bytes / 2**20:.0f} MiB of bf16 weights")
        results = {}
        for kind in ("fuselm", "transformers"):
            out = subprocess.run([sys.executable, "-c", PROBE, kind, tmp], capture_output=True, text=True)
            if out.returncode:
                print(f"{kind}: failed\n{out.stderr[-2000:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            ratio = (r["peak_mb"] - r["base_mb"]) * 2**20 / weight_bytes
            results[kind] = ratio
            print(f"{kind:<13} peak RSS over imports: {r['peak_mb'] - r['base_mb']:.0f} MiB = {ratio:.2f}x weights")
        if len(results) == 2:
            print(f"fuselm / transformers peak-RSS ratio: {results['fuselm'] / results['transformers']:.2f}")


if __name__ == "__main__":
    main()
