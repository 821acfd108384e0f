"""Mutation fuzzer for fuselm's readers: every mutant gets `fuselm.load` + a 4-token chat generate in its own
process (20 s timeout, 3 GiB address-space limit), and is classified:

  OK       loaded and generated            REFUSED  one FuselmError naming the file (or its key/tensor)
  (a mutant that times out is run again with a 90 s timeout: on shared cores a slow run is often the machine)
  RAW      an exception other than FuselmError escaped (a bug: the signature says where)
  VAGUE    a FuselmError that names neither the mutated file nor the model path
  HANG     still running after the timeout  OOM  MemoryError / allocation failure; BIGMEM: peak RSS over 1 GiB
  CRASH    the process died from a signal (segfault, abort)

Seeds (built once into --work with fuselm's own CLI and writers): the demo model and its VQGAN companion, GGUF
F32/F16/Q8_0/Q4_K_M written by `fuselm quantize`, an HF safetensors directory, HF .bin directories (zip and legacy
formats), and a Meta checkpoint (params.json, consolidated.00.pth, tokenizer/text_tokenizer.json).
Mutations: benchmarks/fuzz_mutators.py (bytes, JSON fields, safetensors header entries, GGUF metadata keys, chat
templates).

Each worker imports torch and fuselm once and forks one child per mutant, so a mutant costs its load and generate,
not an interpreter start.

  python benchmarks/fuzz.py --mutants 300                 # short run: about 3 minutes on 2 cores
  python benchmarks/fuzz.py --mutants 10000 --json r.json  # the long run: about 90 minutes on 2 cores
  python benchmarks/fuzz.py --recheck /tmp/fuselm-fuzz/found # an earlier run's kept mutants, with today's code
Measured on 2 shared cores: 1000 mutants in 541 s. Non-OK mutants are kept under WORK/found/NNNNNN-SEED/ with
RESULT.json, ready to reproduce with `fuselm inspect` or a regression test.
"""

from __future__ import annotations

import argparse
import collections
import faulthandler
import json
import multiprocessing
import os
import random
import resource
import select
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from fuzz_mutators import mutate  # noqa: E402

TIMEOUT_S = 20
RETRY_TIMEOUT_S = 90  # a timed-out mutant's second chance
ADDRESS_SPACE = 3 * 2**30
BIG_RSS_KB = 2**20  # 1 GiB
FUSELM = Path(__file__).resolve().parents[1] / "src" / "fuselm"
DEMO = FUSELM / "demo" / "weights"


@dataclass(frozen=True)
class Seed:
    name: str
    root: Path  # a directory holding the model
    load: str  # what fuselm.load gets, relative to root ("." for the directory itself)
    files: tuple[str, ...]  # the files a mutant may change


# ---------------------------------------------------------------- seeds

def _cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "fuselm", *args], check=True, stdout=subprocess.DEVNULL)


def build_seeds(work: Path) -> list[Seed]:
    seeds = []
    demo = work / "demo"
    if not demo.is_dir():
        shutil.copytree(DEMO, demo, ignore=shutil.ignore_patterns("*.md"))
    seeds.append(Seed("demo", demo, "demo.gguf", ("demo.gguf", "demo-vqgan.gguf", "tokenizer.json",
                                                     "tokenizer_config.json")))
    for ftype in ("F32", "F16", "Q8_0", "Q4_K_M"):
        d = work / f"gguf-{ftype}"
        if not (d / "model.gguf").is_file():
            d.mkdir(parents=True, exist_ok=True)
            _cli("quantize", str(demo / "demo.gguf"), str(d / "model.gguf"), "--type", ftype)
        seeds.append(Seed(f"gguf-{ftype}", d, "model.gguf", ("model.gguf",)))
    hf = work / "hf-safetensors"
    if not (hf / "config.json").is_file():
        _cli("regroup-qknorm", str(demo / "demo.gguf"), str(hf), "--groups", "per-head", "--format", "hf")
    side = tuple(p.name for p in sorted(hf.iterdir()) if p.suffix == ".json")
    seeds.append(Seed("hf-safetensors", hf, ".", ("model.safetensors", *side)))
    seeds += _bin_seeds(work, hf, side)
    meta = _meta_seed(work, hf)
    if meta is not None:
        seeds.append(meta)
    return seeds


def _bin_seeds(work: Path, hf: Path, side: tuple[str, ...]) -> list[Seed]:
    import torch

    from fuselm.formats.hf import open_safetensors

    out = []
    for name, zipped in (("hf-bin", True), ("hf-bin-legacy", False)):
        d = work / name
        if not (d / "pytorch_model.bin").is_file():
            d.mkdir(exist_ok=True)
            for f in side:
                shutil.copy(hf / f, d / f)
            tensors = {k: v.clone() for k, v in open_safetensors(hf / "model.safetensors").items()}
            torch.save(tensors, d / "pytorch_model.bin", _use_new_zipfile_serialization=zipped)
        out.append(Seed(name, d, ".", ("pytorch_model.bin", "config.json")))
    return out


def _meta_seed(work: Path, hf: Path) -> Seed | None:
    """A Meta-layout checkpoint made from the HF seed with archs.meta (skipped, with a note, if that API moved)."""
    d = work / "meta"
    if not (d / "model" / "consolidated.00.pth").is_file():
        try:
            import torch

            from fuselm import archs
            from fuselm.archs.meta import internal_to_meta
            from fuselm.formats.hf import read_config, read_weights

            config = archs.config_from_hf(read_config(hf), source=str(hf))
            state = archs.hf_to_internal(config, read_weights(hf), source=str(hf))
            params, shards = internal_to_meta(config, state, config.num_attention_heads)
        except Exception as err:  # noqa: BLE001 (a seed we cannot build is reported, not fatal)
            print(f"note: no Meta seed ({err.__class__.__name__}: {err})", file=sys.stderr)
            return None
        (d / "model").mkdir(parents=True, exist_ok=True)
        (d / "tokenizer").mkdir(exist_ok=True)
        model_params = {k: v for k, v in params.items() if k != "model_parallel_size"}
        (d / "model" / "params.json").write_text(json.dumps({"model": model_params}))
        (d / "model" / "consolidate_params.json").write_text(json.dumps({"model_parallel_size": len(shards)}))
        for i, shard in enumerate(shards):
            torch.save(shard, d / "model" / f"consolidated.{i:02d}.pth")
        shutil.copy(hf / "tokenizer.json", d / "tokenizer" / "text_tokenizer.json")
    files = ("model/params.json", "model/consolidated.00.pth", "tokenizer/text_tokenizer.json")
    return Seed("meta", d, "model", files)


# ---------------------------------------------------------------- running one mutant

def _warm() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    import fuselm  # noqa: F401

    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops the pool
    try:  # build (or fail to build) the native kernels once here, not once per forked child
        from fuselm.quants.kernel_build import native_library

        native_library()
    except Exception as err:  # noqa: BLE001 (an optional speed-up)
        print(f"note: native kernels: {err}", file=sys.stderr)


def _prepare(seed: Seed, file: str, data: bytes, scratch: Path) -> Path:
    if scratch.exists():
        shutil.rmtree(scratch)
    for src in seed.root.rglob("*"):
        dst = scratch / src.relative_to(seed.root)
        if src.is_dir():
            dst.mkdir(parents=True, exist_ok=True)
        elif str(src.relative_to(seed.root)) != file:
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.link(src, dst)  # readers map files privately (copy-on-write): the seed is never written
    (scratch / file).parent.mkdir(parents=True, exist_ok=True)
    (scratch / file).write_bytes(data)
    return scratch / seed.load


def _child(load_path: Path, mutated: Path, out_fd: int, stack_file: Path, timeout: float) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
    stacks = open(stack_file, "w")  # noqa: SIM115 (open until the process ends)
    faulthandler.dump_traceback_later(timeout - 3, file=stacks)  # where a HANG is, just before the kill
    import fuselm
    from fuselm.errors import FuselmError

    result: dict = {}
    try:
        model = fuselm.load(load_path)
        list(fuselm.generate(model, [{"role": "user", "content": "a red circle"}], max_tokens=4, seed=0))
        result = {"outcome": "OK"}
    except FuselmError as err:
        text = str(err)
        named = mutated.name in text or (mutated.is_relative_to(load_path) and str(load_path) in text)
        result = {"outcome": "REFUSED" if named else "VAGUE", "message": text[:300],
                  **({} if named else _where(err))}
    except MemoryError:
        result = {"outcome": "OOM", "message": "MemoryError"}
    except BaseException as err:  # noqa: BLE001 (classifying every escape is the point)
        text = f"{err.__class__.__name__}: {str(err)[:200]}"
        oom = "allocate" in str(err) or "out of memory" in str(err).lower()
        result = {"outcome": "OOM" if oom else "RAW", "message": text, **_where(err)}
    os.write(out_fd, json.dumps(result).encode())
    os._exit(0)


def _where(err: BaseException) -> dict:
    """The innermost fuselm frame of the traceback, and whether it is reader code (formats, templates) or the
    architecture/loader/model side."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if str(FUSELM) in f.filename]
    if not frames:
        return {"signature": f"{err.__class__.__name__} (outside fuselm)", "area": "other"}
    f = frames[-1]
    rel = str(Path(f.filename).relative_to(FUSELM))
    mine = rel.startswith("formats/") or rel in ("generation/chat.py", "generation/template_sandbox.py")
    return {"signature": f"{err.__class__.__name__} at {rel}:{f.lineno} {f.name}",
            "area": "formats/templates" if mine else "archs/loader/model"}


def _hang_site(stack_file: Path) -> dict:
    """The innermost fuselm frame of the stack faulthandler dumped shortly before the timeout."""
    try:
        lines = stack_file.read_text().splitlines()
    except OSError:
        return {}
    for line in lines:  # "  File "...", line N in name", most recent call first
        if str(FUSELM) in line and line.strip().startswith("File"):
            path, _, rest = line.strip()[len('File "'):].partition('", line ')
            rel = str(Path(path).relative_to(FUSELM))
            mine = rel.startswith("formats/") or rel in ("generation/chat.py", "generation/template_sandbox.py")
            return {"signature": f"stuck at {rel}:{rest}", "area": "formats/templates" if mine
                    else "archs/loader/model"}
    return {}


def _run_child(load_path: Path, mutated: Path, stack_file: Path, timeout: float) -> tuple[dict, int]:
    """Load + generate in a forked child: (outcome fields, peak RSS in KiB)."""
    read_fd, write_fd = os.pipe()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        try:
            _child(load_path, mutated, write_fd, stack_file, timeout)
        finally:
            os._exit(3)
    os.close(write_fd)
    chunks, timed_out = [], False
    while True:
        left = timeout - (time.monotonic() - start)
        ready, _, _ = select.select([read_fd], [], [], max(left, 0))
        if not ready:
            timed_out = True
            os.kill(pid, signal.SIGKILL)
            break
        chunk = os.read(read_fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read_fd)
    _, status, usage = os.wait4(pid, 0)
    result = {"seconds": time.monotonic() - start}
    if timed_out:
        result.update(outcome="HANG", **_hang_site(stack_file))
    elif os.WIFSIGNALED(status):
        result.update(outcome="CRASH", message=f"signal {os.WTERMSIG(status)}")
    elif not chunks:
        result.update(outcome="CRASH", message=f"exit status {os.WEXITSTATUS(status)} without a result")
    else:
        result.update(json.loads(b"".join(chunks)))
    return result, usage.ru_maxrss


def _classify(load_path: Path, mutated: Path, stack_file: Path) -> dict:
    """One mutant's outcome. A timeout is retried once with RETRY_TIMEOUT_S: on 2 shared cores a slow load is
    often the machine, not the mutant; a HANG is what is still running after the long wait."""
    result, rss = _run_child(load_path, mutated, stack_file, TIMEOUT_S)
    if result["outcome"] == "HANG":
        first = result["seconds"]
        result, rss = _run_child(load_path, mutated, stack_file, RETRY_TIMEOUT_S)
        result["first_try_s"] = first
    result["peak_rss_kb"] = rss
    if result["outcome"] in ("OK", "REFUSED") and rss > BIG_RSS_KB:
        result["outcome"] = "BIGMEM"
    return result


def run_one(task: tuple) -> dict:
    index, seed, file, rng_seed, work = task
    rng = random.Random(rng_seed)
    raw = (seed.root / file).read_bytes()
    try:
        data, what = mutate(seed.root / file, raw, rng)
    except Exception as err:  # noqa: BLE001 (a mutator bug must not stop the run)
        return {"index": index, "seed": seed.name, "file": file, "outcome": "SKIP", "message": repr(err)[:200]}
    scratch = Path(work) / f"scratch-{os.getpid()}"
    load_path = _prepare(seed, file, data, scratch)
    stack_file = Path(work) / f"stack-{os.getpid()}.txt"
    result = {"index": index, "seed": seed.name, "file": file, "mutation": what,
              **_classify(load_path, scratch / file, stack_file)}
    if result["outcome"] not in ("OK", "REFUSED", "SKIP"):
        keep = Path(work) / "found" / f"{index:06d}-{seed.name}"
        shutil.copytree(scratch, keep, copy_function=shutil.copy, dirs_exist_ok=True)
        (keep / "RESULT.json").write_text(json.dumps(result, indent=1))
    return result


def recheck(found: Path, work: Path) -> list[dict]:
    """Run every mutant an earlier run kept (its RAW, VAGUE, HANG, ... cases) again with today's code, one at a
    time and with the retry's long timeout; their new outcomes."""
    seeds = {s.name: s for s in build_seeds(work)}
    out = []
    for result_file in sorted(found.glob("*/RESULT.json")):
        old = json.loads(result_file.read_text())
        folder = result_file.parent
        load = folder / seeds[old["seed"]].load
        new, rss = _run_child(load, folder / old["file"], work / "stack-recheck.txt", RETRY_TIMEOUT_S)
        outcome = "BIGMEM" if new["outcome"] in ("OK", "REFUSED") and rss > BIG_RSS_KB else new["outcome"]
        out.append({**old, "recheck": outcome, "recheck_s": round(new["seconds"], 1),
                    "recheck_message": new.get("message", "")[:200]})
        print(f"{folder.name}: {old['outcome']} -> {outcome} in {new['seconds']:.1f} s", file=sys.stderr)
    return out


# ---------------------------------------------------------------- driver and report

def tasks(seeds: list[Seed], n: int, seed: int, work: Path):
    rng = random.Random(seed)
    for i in range(n):
        s = seeds[i % len(seeds)]
        yield i, s, rng.choice(s.files), rng.getrandbits(64), str(work)


def report(results: list[dict], elapsed: float) -> str:
    outcomes = ["OK", "REFUSED", "RAW", "VAGUE", "HANG", "OOM", "BIGMEM", "CRASH", "SKIP"]
    counts = collections.Counter(r["outcome"] for r in results)
    lines = [f"{len(results)} mutants in {elapsed:.0f} s", "", "| outcome | count |", "|---|---|"]
    lines += [f"| {o} | {counts[o]} |" for o in outcomes if counts[o] or o in ("RAW", "VAGUE", "HANG", "OOM")]
    by_seed = collections.defaultdict(collections.Counter)
    for r in results:
        by_seed[r["seed"]][r["outcome"]] += 1
    lines += ["", "| seed | " + " | ".join(outcomes) + " |", "|---" * (len(outcomes) + 1) + "|"]
    lines += [f"| {s} | " + " | ".join(str(c[o]) for o in outcomes) + " |" for s, c in sorted(by_seed.items())]
    bad = [r for r in results if r["outcome"] in ("RAW", "VAGUE", "HANG", "OOM", "BIGMEM", "CRASH")]
    areas = collections.Counter((r["outcome"], r.get("area", "-")) for r in bad)
    if areas:
        lines += ["", "| outcome | where | count |", "|---|---|---|"]
        lines += [f"| {o} | {a} | {c} |" for (o, a), c in sorted(areas.items())]
    sigs = collections.Counter((r["outcome"], r.get("signature") or r.get("message", "")[:120]) for r in bad)
    if sigs:
        lines += ["", "signatures (count, outcome, where / message, an example mutant):"]
        for (outcome, sig), c in sigs.most_common(40):
            ex = next(r for r in bad if r["outcome"] == outcome and (r.get("signature") or
                                                                       r.get("message", "")[:120]) == sig)
            lines.append(f"  {c:5d} {outcome:6s} {sig}  [#{ex['index']} {ex['seed']}/{ex['file']}: "
                         f"{ex.get('mutation', '')[:60]}]")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mutants", type=int, default=300)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path("/tmp/fuselm-fuzz"), help="seeds, scratch and found/")
    ap.add_argument("--json", type=Path, help="write every result here")
    ap.add_argument("--recheck", type=Path, metavar="FOUND", help="run the mutants kept in FOUND (an earlier "
                    f"run's WORK/found) again with today's code and a {RETRY_TIMEOUT_S} s timeout, one at a time")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.recheck is not None:
        _warm()
        rows = recheck(args.recheck, args.work)
        counts = collections.Counter(r["recheck"] for r in rows)
        before = collections.Counter(r["outcome"] for r in rows)
        print(f"{len(rows)} kept mutants rechecked: before {dict(before)}, now {dict(counts)}")
        for r in rows:
            if r["recheck"] not in ("OK", "REFUSED"):
                print(f"  #{r['index']} {r['seed']}/{r['file']} {r['mutation'][:60]}: {r['recheck']} "
                      f"{r['recheck_message']}")
        if args.json:
            args.json.write_text(json.dumps(rows, indent=0))
        return 0
    seeds = build_seeds(args.work)
    print("seeds: " + ", ".join(s.name for s in seeds), file=sys.stderr)
    results, start = [], time.monotonic()
    with multiprocessing.get_context("fork").Pool(args.workers, initializer=_warm) as pool:
        try:
            for r in pool.imap_unordered(run_one, tasks(seeds, args.mutants, args.seed, args.work)):
                results.append(r)
                if len(results) % 50 == 0:
                    print(f"{len(results)}/{args.mutants} "
                          f"{dict(collections.Counter(x['outcome'] for x in results))}", file=sys.stderr)
        except KeyboardInterrupt:
            pool.terminate()
    print(report(results, time.monotonic() - start))
    if args.json:
        args.json.write_text(json.dumps(results, indent=0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
