"""Llama-2-7B shape: Q4_K_M decode and prefill, fuselm vs llama.cpp; and the time to draw one picture.

    python benchmarks/bench_7b.py [--workdir /work/tmp] [--threads 2] [--quantizer llama.cpp|fuselm]
    python benchmarks/bench_7b.py --chameleon MODEL.gguf   # picture times only, on a Chameleon-7B-shape model

Text part: random weights at Llama-2-7B's dimensions (dim 4096, 32 layers, 32 heads, ffn 11008, vocab 32000)
are written as an F16 GGUF one tensor at a time (13 GB on disk, never all in memory), then quantized to
Q4_K_M by llama.cpp's own quantizer (llama_cpp.llama_model_quantize, in a child process) or by fuselm's
(--quantizer fuselm). benchmarks/decode.py's worker then times each engine in a fresh process: a 128-token
prompt (prefill tok/s) and 32 decoded tokens (decode tok/s), best of three windows. The files are deleted at
the end unless --keep. Needs ~18 GB free disk (checked first) and ~5 GB of RAM per engine.

Picture estimate (default, --picture-steps N): image-token decode steps at 1 and 3 cache rows on the 7B file,
scaled to 1024 tokens, plus a VQGAN decode at Chameleon's shape (see picture_estimate).

Picture part (--chameleon): a 1024-token picture (32x32 codes) with fuselm.generate(images="only"), once
with the layout's default classifier-free guidance and once with cfg="off": seconds per picture and image
tokens per second. The model (a Chameleon-7B-shape GGUF with its -vqgan companion) comes from the caller.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decode  # noqa: E402  (the per-engine worker and the vocabulary file)

DIM, LAYERS, HEADS, FFN, VOCAB, CTX = 4096, 32, 32, 11008, 32000, 4096
NEEDED_GB = 18


def tensor_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """GGUF names and numpy shapes [rows, cols] of a Llama-2-7B, in llama.cpp's order."""
    shapes = [("token_embd.weight", (VOCAB, DIM))]
    for i in range(LAYERS):
        b = f"blk.{i}."
        shapes += [(b + "attn_norm.weight", (DIM,)), (b + "attn_q.weight", (DIM, DIM)),
                   (b + "attn_k.weight", (DIM, DIM)), (b + "attn_v.weight", (DIM, DIM)),
                   (b + "attn_output.weight", (DIM, DIM)), (b + "ffn_norm.weight", (DIM,)),
                   (b + "ffn_gate.weight", (FFN, DIM)), (b + "ffn_up.weight", (FFN, DIM)),
                   (b + "ffn_down.weight", (DIM, FFN))]  # fmt: skip
    return shapes + [("output_norm.weight", (DIM,)), ("output.weight", (VOCAB, DIM))]


def add_metadata(writer, key: str, value) -> None:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, list(value))


def write_f16(path: Path) -> None:
    import gguf

    from fuselm.formats.gguf import read_gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(CTX)
    writer.add_embedding_length(DIM)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(HEADS)
    writer.add_rope_dimension_count(DIM // HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for key, value in read_gguf(decode.VOCAB).metadata.items():
        if key.startswith("tokenizer."):
            add_metadata(writer, key, value)
    shapes = tensor_shapes()
    for name, shape in shapes:
        dtype = np.float16 if len(shape) == 2 else np.float32
        writer.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for _name, shape in shapes:  # in add_tensor_info's order, one tensor in memory at a time
        if len(shape) == 1:
            data = np.ones(shape, dtype=np.float32)
        else:
            data = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)
        writer.write_tensor_data(data)
    writer.close()


QUANTIZE_CHILD = r"""
import sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
params.nthread = int(sys.argv[3])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params))
"""


def quantize(src: Path, out: Path, quantizer: str, threads: int) -> None:
    if quantizer == "llama.cpp":
        rc = subprocess.run([sys.executable, "-c", QUANTIZE_CHILD, str(src), str(out), str(threads)]).returncode
        if rc != 0:
            sys.exit(f"llama.cpp's quantizer failed (exit {rc}); try --quantizer fuselm")
    else:
        from fuselm.reshape import quantize_model

        quantize_model(src, out, "Q4_K_M")


def text_part(args) -> None:
    workdir = Path(args.workdir or tempfile.gettempdir())
    if not decode.VOCAB.is_file():
        sys.exit(f"missing {decode.VOCAB}: run `make .venv/llama-sdist/.ok` first")
    # --keep: a fixed folder whose finished Q4_K_M file (marked by a stamp) later runs reuse
    folder = workdir / "fuselm-7b" if args.keep else Path(tempfile.mkdtemp(prefix="fuselm-7b-", dir=workdir))
    f16, q4, stamp = folder / "llama2-7b-F16.gguf", folder / "llama2-7b-Q4_K_M.gguf", folder / "Q4_K_M.done"
    try:
        if not stamp.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            free_gb = shutil.disk_usage(folder).free / 1e9
            if free_gb < NEEDED_GB:
                sys.exit(f"{workdir}: {free_gb:.0f} GB free, need {NEEDED_GB} GB for the F16 and Q4_K_M files")
            t0 = time.perf_counter()
            write_f16(f16)
            print(f"F16 written: {f16.stat().st_size / 1e9:.1f} GB in {time.perf_counter() - t0:.0f} s", flush=True)
            t0 = time.perf_counter()
            quantize(f16, q4, args.quantizer, args.threads)
            f16.unlink()
            stamp.write_text(args.quantizer)
            print(f"Q4_K_M ({args.quantizer}): {q4.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s",
                  flush=True)
        rows = {}
        for kind in ("fuselm", "llama.cpp"):
            rows[kind] = decode.measure(kind, q4, args.threads, 128, 32)
        ours, theirs = rows["fuselm"], rows["llama.cpp"]
        for what in ("prefill_tok_s", "decode_tok_s"):
            o = ours[what] if ours else float("nan")
            t = theirs[what] if theirs else float("nan")
            print(f"7B Q4_K_M {what[:-6]:8s} fuselm {o:7.2f} tok/s  llama.cpp {t:7.2f} tok/s  ratio {o / t:5.2f}x",
                  flush=True)
        if ours:
            size = q4.stat().st_size / 2**30
            print(f"fuselm peak RSS {ours['peak_rss_mb'] / 1024:.2f} GiB for a {size:.2f} GiB file", flush=True)
        if args.picture_steps:
            picture_estimate(q4, args.threads, args.picture_steps)
    finally:
        if args.keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


def picture_estimate(q4: Path, threads: int, steps: int) -> None:
    """A picture's cost on the 7B shape, from parts measured here: `steps` image-token decode steps at 1 row (no
    guidance) and 3 rows (Meta's 3-way CFG: the main row and two guidance rows, one batched forward per token)
    after a 64-token prompt, scaled to Chameleon's 1024 tokens; plus one decode of a 32x32 grid by a VQGAN of
    Chameleon's shape (random weights). The transformer is the Llama-2-7B-shape file: Chameleon-7B has the same
    layers; its 65536-token lm_head (vs 32000) and qk-norm add a few percent per token, not counted here."""
    import torch

    import fuselm
    from fuselm.generation.decoder import Decoder
    from fuselm.threads import set_threads
    from fuselm.vision import ImageTokenizer
    from fuselm.vision.vqgan import VQGAN, VQGANConfig

    set_threads(threads)
    model = fuselm.load(q4)
    per_token = {}
    for rows in (1, 3):
        decoder = Decoder(model.transformer, rows, 64 + steps + 8)
        taken = [decoder.take_row(list(range(100, 164))) for _ in range(rows)]
        decoder.feed(taken)  # the prompts
        t0 = time.perf_counter()
        for i in range(steps):
            decoder.push(taken, [200 + i])
            decoder.feed(taken)
        per_token[rows] = (time.perf_counter() - t0) / steps
    torch.manual_seed(0)
    tokenizer = ImageTokenizer(VQGAN(VQGANConfig(), decoder=True).eval())
    t0 = time.perf_counter()
    with torch.inference_mode():
        tokenizer.decode(torch.randint(0, 8192, (1, 1024)))
    vq_s = time.perf_counter() - t0
    for rows, label in ((1, "no CFG"), (3, "3-way CFG")):
        total = 1024 * per_token[rows] + vq_s
        print(f"picture ({label}, 1024 tokens): {total:.0f} s = 1024 x {per_token[rows] * 1e3:.0f} ms "
              f"(measured over {steps} steps at {rows} row{'s' if rows > 1 else ''}) + VQGAN decode {vq_s:.1f} s",
              flush=True)


def picture_part(path: str, seed: int) -> None:
    import fuselm
    from fuselm.generation.stream import ImageDone

    model = fuselm.load(path)
    for cfg in (None, "off"):
        options = {} if cfg is None else {"cfg": cfg}
        t0 = time.perf_counter()
        tokens = 0
        for event in fuselm.generate(model, "A picture of a cat.", images="only", max_tokens=1100, seed=seed,
                                     **options):  # fmt: skip
            if isinstance(event, ImageDone):
                break
            tokens += 1
        took = time.perf_counter() - t0
        label = "default CFG" if cfg is None else "no CFG"
        print(f"picture ({label}): {took:.1f} s for one picture ({tokens} events), {1024 / took:.2f} image tok/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quantizer", choices=("llama.cpp", "fuselm"), default="llama.cpp")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--chameleon", default=None, metavar="MODEL.gguf", help="time pictures on this model instead")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--picture-steps", type=int, default=32,
                    help="image-token steps timed for the picture estimate on the 7B file (0: skip it)")
    args = ap.parse_args()
    if args.chameleon:
        picture_part(args.chameleon, args.seed)
    else:
        text_part(args)


if __name__ == "__main__":
    main()
