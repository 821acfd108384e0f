"""Cost of drawing an image versus writing text, with and without classifier-free guidance.

1. A tiny random Chameleon-shaped model run through fuselm.generation.mixed end to end: seconds per image token
   and per 32x32 image (1024 tokens) with cfg off / Lumina 2-way / Meta 3-way, against seconds per text token.
2. The real 7B shape, extrapolated from one decoder layer (hidden 4096, 32 heads, FFN 11008, bf16, qk-norm):
   one decode step at the KV length of an image for 1, 2 and 3 rows, times 32 layers, plus the 65536-wide
   lm_head. Optionally (--vqgan) the real 512x512 VQGAN decoder once (random weights), which is what each
   ImageProgress partial and each ImageDone costs.

    .venv/bin/python benchmarks/image_generation.py [--threads N] [--no-vqgan] [--quick]

The tiny model runs on one thread (its steps are overhead-bound; more threads only spin on a shared machine).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch

from fuselm.config import ModelConfig
from fuselm.generation.mixed import generate_mixed
from fuselm.generation.sampling import SamplingParams
from fuselm.generation.stream import Done, ImageDone
from fuselm.load import Model
from fuselm.model.cache import KVCache
from fuselm.model.transformer import Transformer
from fuselm.vision import VQGAN, ImageTokenizer, VQGANConfig, image_token_name

print = functools.partial(print, flush=True)  # noqa: A001 (progress shows while it runs)

IMAGE_TOKENS = 1024  # 512x512 -> 32x32
REAL_LAYERS = 32


def chameleon_names(vocab_size: int, codes: int) -> dict[str, int]:
    """Chameleon's id plan: 4 specials, image tokens from id 4, boi/eoi, reserved tokens, then text."""
    names = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    names.update({image_token_name(i): 4 + i for i in range(codes)})
    nxt = 4 + codes
    for special in ("<eoss>", "<racm3:break>", "<reserved08706>", "<reserved08799>",
                    *(f"<reserved{8800 + n:05d}>" for n in range(1, 33))):
        names[special] = nxt
        nxt += 1
    names.update({f"w{i}": i for i in range(nxt, vocab_size)})
    return names


def random_transformer(config: ModelConfig, dtype: torch.dtype) -> Transformer:
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to_empty(device="cpu").to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                p.normal_(0.0, 0.02)
    return model.eval()


def tiny_model() -> Model:
    codes = 8192
    names = chameleon_names(16384, codes)
    config = ModelConfig(arch="chameleon", vocab_size=16384, hidden_size=256, intermediate_size=688,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, head_dim=64,
                         max_position_embeddings=4096, qk_norm=True, bos_token_id=0, eos_token_ids=(2,),
                         extra={"vocabulary_map": names})
    torch.manual_seed(0)
    vq = VQGAN(VQGANConfig(embed_dim=8, num_embeddings=codes, latent_channels=8, base_channels=32,
                           channel_multiplier=(1, 1), resolution=64, num_res_blocks=1))  # 64 px -> 32x32 codes
    return Model(random_transformer(config, torch.float32), None, image_tokenizer=ImageTokenizer(vq),
                 source="tiny")


def no_eos(state, logits):
    logits = logits.clone()
    logits[:, [2]] = -torch.inf  # keep text going for the text-token timing
    return logits


def bench_tiny(repeats: int) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _bench_tiny(repeats)
    finally:
        torch.set_num_threads(threads)


def _bench_tiny(repeats: int) -> None:
    model = tiny_model()
    prompt = [0] + list(range(9000, 9020))
    print("tiny model (1 thread): hidden 256, 4 layers, vocab 16384, 32x32 image = 1024 tokens (+ eoss)")
    text = []
    for _ in range(repeats):
        done = list(generate_mixed(model, prompt, images="off", max_tokens=256, processors=[no_eos]))[-1]
        text.append(done.timings["text_s"] / done.timings["text_tokens"])
    t_text = statistics.median(text)
    print(f"  text token                        {t_text * 1e3:8.3f} ms")
    for cfg in ("off", "lumina", "meta"):
        per_tok, per_img = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            events = list(generate_mixed(model, prompt, images="only", cfg=cfg, progress_every=0,
                                         image_sampling=SamplingParams(temperature=1.0)))
            per_img.append(time.perf_counter() - t0)
            done = events[-1]
            assert isinstance(done, Done) and isinstance(events[-2], ImageDone)
            per_tok.append(done.timings["image_s"] / done.timings["image_tokens"])
        tok = statistics.median(per_tok)
        rows = {"off": 1, "lumina": 2, "meta": 3}[cfg]
        print(f"  image token, cfg {cfg:6s} ({rows} rows) {tok * 1e3:8.3f} ms  = {tok / t_text:4.2f} x text;"
              f"  per image {statistics.median(per_img):6.2f} s")


def step_time(model: Transformer, rows: int, kv_len: int, repeats: int, pad: list[int] | None = None) -> float:
    """Fastest of `repeats` one-token decode steps (the minimum is the least disturbed by other processes)."""
    c = model.config
    cache = KVCache(c, rows, kv_len + repeats + 4, dtype=model.embed.weight.dtype)
    for layer in cache.layers:
        layer.k[:, :, :kv_len].normal_()
        layer.v[:, :, :kv_len].normal_()
    cache.length = kv_len
    if pad is not None:
        cache.pad = torch.tensor(pad)
    tok = torch.full((rows, 1), 5000, dtype=torch.long)
    times = []
    with torch.inference_mode():
        model(tok, cache=cache)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(tok, cache=cache)
            times.append(time.perf_counter() - t0)
    return min(times)


def head_time(model: Transformer, rows: int, repeats: int) -> float:
    x = torch.randn(rows, 1, model.config.hidden_size, dtype=model.embed.weight.dtype)
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            model.lm_head(model.norm(x))
            times.append(time.perf_counter() - t0)
    return min(times[1:])


def bench_7b(repeats: int, dram_gbs: float) -> None:
    config = ModelConfig(arch="chameleon", vocab_size=65536, hidden_size=4096, intermediate_size=11008,
                         num_hidden_layers=1, num_attention_heads=32, num_key_value_heads=32, head_dim=128,
                         max_position_embeddings=4096, qk_norm=True)
    model = random_transformer(config, torch.bfloat16)
    layer_bytes = sum(p.numel() * p.element_size() for p in model.layers[0].parameters())
    head_bytes = model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    kv_bytes = 2 * config.kv_dim * 2  # K and V per position per layer, bf16
    prompt = 32
    print(f"\n7B shape (hidden 4096, 32 heads, FFN 11008, bf16): one layer ({layer_bytes / 1e6:.0f} MB) and the "
          f"lm_head ({head_bytes / 1e6:.0f} MB) measured, x{REAL_LAYERS} layers:")
    cases = [("text", 1, prompt + 256, None), ("image, cfg off", 1, prompt + IMAGE_TOKENS // 2, None),
             ("image, Lumina cfg", 2, prompt + IMAGE_TOKENS // 2, [0, prompt]),
             ("image, Meta cfg", 3, prompt + IMAGE_TOKENS // 2, [0, prompt - 2, prompt - 2])]
    text_token = text_model = None
    for label, rows, kv, pad in cases:
        step = step_time(model, rows, kv, repeats, pad)
        head = head_time(model, rows, repeats)
        layer = max(step - head, 1e-9)
        per_token = REAL_LAYERS * layer + head
        # What streaming the weights and every row's KV cache once per token costs at the DRAM rate.
        model_s = (REAL_LAYERS * (layer_bytes + rows * kv * kv_bytes) + head_bytes) / (dram_gbs * 1e9)
        text_token, text_model = text_token or per_token, text_model or model_s
        line = (f"  {label:18s} {rows} row{'s' if rows > 1 else ' '} KV {kv:4d}: layer {layer * 1e3:6.1f} ms "
                f"({layer_bytes / layer / 1e9:4.1f} GB/s), head {head * 1e3:5.1f} ms -> {per_token:5.2f} s/token "
                f"= {per_token / text_token:4.2f} x text | at {dram_gbs:.0f} GB/s: {model_s:5.3f} s/token "
                f"= {model_s / text_model:4.2f} x text")
        if label.startswith("image"):
            line += f", {model_s * (IMAGE_TOKENS + 1) / 60:4.1f} min/image (measured: " \
                    f"{per_token * (IMAGE_TOKENS + 1) / 60:5.1f} min)"
        print(line)
    del model


def bench_vqgan() -> None:
    torch.manual_seed(0)
    vq = VQGAN(VQGANConfig()).eval()  # Chameleon's own config: 512x512 <-> 32x32
    codes = torch.randint(0, 8192, (1, IMAGE_TOKENS))
    print("\nChameleon VQGAN decoder, 512x512 (random weights):")
    for dtype in (torch.float32, torch.bfloat16):
        vq.decoder.to(dtype)
        vq.decode(codes, 32, 32)
        t0 = time.perf_counter()
        vq.decode(codes, 32, 32)
        name = str(dtype).removeprefix("torch.")
        print(f"  decode {name:8s} {time.perf_counter() - t0:6.2f} s per image (and per partial picture)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-vqgan", action="store_true", help="skip the 512x512 VQGAN decoder timing")
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--only", choices=["tiny", "7b", "vqgan"], default=None, help="run one part")
    ap.add_argument("--dram-gbs", type=float, default=32.0, help="DRAM read rate for the bandwidth model (32 here)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    repeats = 2 if args.quick else 3
    if args.only in (None, "tiny"):
        bench_tiny(repeats)
    if args.only in (None, "7b"):
        bench_7b(5 if args.quick else 10, args.dram_gbs)
    if args.only == "vqgan" or (args.only is None and not args.no_vqgan):
        bench_vqgan()


if __name__ == "__main__":
    main()
