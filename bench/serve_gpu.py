#!/usr/bin/env python3
"""serve_gpu.py -- gets and puts through vqkvd into worker processes' paged caches.

For each codec, each request size (logical fp16 KV bytes a get writes or a
put reads: 16 MiB to 1 GiB by default) and each number of worker processes
(1 and 8), the workers loop for --seconds on gets of one stored prefix of
that size into their own paged caches (lookup, get with an interprocess
event, the stream waiting on it, synchronized), then for --seconds on puts
of fresh prefixes of that size (evicted again between puts, untimed).
Reported: GB/s over all workers and p50/p99 of a request, next to, in the
same run, the device's own copy of the same bytes (cudaMemcpy device to
device through torch; memcpy on the CPU) and the codec kernels alone
(bench/codec_gpu on as many bytes, its decode and encode GB/s; GPU only).

The model is Llama-3-8B-shaped (32 layers, 8 kv heads of 128, 16-token
blocks: 2 MiB of fp16 a block); the KV is random (the codecs' speed barely
depends on it). The script starts its own vqkvd on cuda:0 (or the CPU) with
a pool that holds every worker's prefix, and calibrates a VQ codec first, as
bench/restore.py does (whose helpers it shares).

    python3 bench/serve_gpu.py --json bench/out/serve_gpu.json
    .venv/bin/python bench/serve_gpu.py --device cpu --shape tiny --sizes 1M,4M --workers 1,2   # no GPU

Needs torch and numpy, the vqkv package (client/python) and this build's
libvqkv and vqkvd.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import restore  # noqa: E402  (puts client/python/src on the path)
import vqkv  # noqa: E402

BLOCK_TOKENS = restore.BLOCK_TOKENS


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def layout_of(shape: str) -> vqkv.Layout:
    s = restore.SHAPES[shape]
    return vqkv.Layout(s["layers"], s["kv_heads"], s["head_dim"], BLOCK_TOKENS, vqkv.DType.F16)


def prefix_keys(model: vqkv.Model, seed: int, blocks: int) -> Any:
    ids = np.random.default_rng(seed).integers(1, 1 << 30, size=blocks * BLOCK_TOKENS, dtype=np.uint32)
    return model.block_keys(ids)


def quantile(values: list[float], q: float) -> float:
    return float(np.quantile(np.asarray(values), q)) if values else float("nan")


def worker(index: int, cfg: dict[str, Any], start: Any, results: Any) -> None:
    """One worker process: its own connection and cache; gets, then puts."""
    import torch

    device, blocks = cfg["device"], cfg["blocks"]
    client = vqkv.Client(cfg["socket"], name=f"serve-gpu-{index}", timeout_ms=600_000)
    layout = layout_of(cfg["shape"])
    model = client.register_model(cfg["model_id"], layout, cfg["codec"])
    cache = restore.Cache(client, model, layout, blocks, device)
    cache.tensor.copy_(torch.randn_like(cache.tensor, dtype=torch.float32))
    restore.sync(device)
    shared = prefix_keys(model, 1, blocks)
    slots = list(range(blocks))
    gets: list[float] = []
    puts: list[float] = []
    start.wait()

    def get_once() -> None:
        restore.get_into(client, model, shared, cache, slots, device)

    t_end = time.perf_counter() + cfg["seconds"]
    t_gets = time.perf_counter()
    while time.perf_counter() < t_end:
        gets.append(restore.timed(device, get_once))
    t_gets = time.perf_counter() - t_gets
    start.wait()
    seq, t_puts = 0, 0.0
    t_end = time.perf_counter() + cfg["seconds"]
    while time.perf_counter() < t_end:
        keys = prefix_keys(model, 1000 + index * 1_000_000 + seq, blocks)
        seq += 1
        t = restore.timed(device, lambda: client.put(model, cache.region, keys, slots))
        puts.append(t)
        t_puts += t
        client.evict(model, keys)
    results.put(dict(index=index, gets=gets, get_wall=t_gets, puts=puts, put_wall=t_puts))
    client.close()


def copy_baseline(device: str, nbytes: int, repeats: int) -> float:
    """GB/s of the device copying nbytes from one buffer to another."""
    import torch

    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    return nbytes / restore.median_of(device, lambda: b.copy_(a), repeats) / 1e9


def kernel_baseline(binary: str, codec: str, nbytes: int, tmp: str) -> dict[str, float] | None:
    """bench/codec_gpu on as many fp16 bytes (its 4 MiB blocks): decode and
    encode GB/s of the kernels alone; None where it cannot run."""
    out = os.path.join(tmp, "codec_gpu.json")
    blocks = max(1, nbytes // (4 << 20))
    done = subprocess.run([binary, "--blocks", str(blocks), "--json", out, codec], capture_output=True, text=True)
    if done.returncode != 0:
        return None
    row = json.loads(Path(out).read_text())["results"][0]
    return dict(decode_gbps=row["decode_gbps"], encode_gbps=row["encode_gbps"])


def run_codec(args: argparse.Namespace, codec: str, tmp: str) -> list[dict[str, Any]]:
    import torch

    layout = layout_of(args.shape)
    most = max(args.sizes) // layout.block_bytes
    # Every worker's puts stay until evicted, one prefix each at a time,
    # next to the shared one and the warm-up: fp16 at worst.
    pool_blocks = most * (max(args.workers) + 1) + args.warmup_tokens // BLOCK_TOKENS
    pool = int(layout.block_bytes * pool_blocks * 1.25) + (64 << 20)
    daemon = restore.start_vqkvd(args.vqkvd, args.device, pool, args.warmup_tokens, tmp)
    rows = []
    try:
        client = vqkv.Client(str(daemon.socket), name="serve-gpu-setup", timeout_ms=600_000)
        model_id = f"bench/serve-gpu-{args.shape}"
        model = client.register_model(model_id, layout, codec)
        setup = restore.Cache(client, model, layout, most, args.device)
        if not model.codebooks_ready:
            model = restore.warm_up_codec(client, model, setup, args.warmup_tokens, args.device)
        ctx = mp.get_context("spawn")
        for size in args.sizes:
            blocks = size // layout.block_bytes
            if blocks == 0:
                raise SystemExit(f"serve_gpu.py: {size} bytes is less than one block ({layout.block_bytes})")
            logical = blocks * layout.block_bytes
            setup.tensor[:, :, :blocks].copy_(torch.randn_like(setup.tensor[:, :, :blocks], dtype=torch.float32))
            restore.sync(args.device)
            client.evict(model, all=True)
            put = client.put(model, setup.region, prefix_keys(model, 1, blocks), list(range(blocks)))
            if put.stored != blocks:
                raise SystemExit(f"serve_gpu.py: {put.stored} of {blocks} blocks stored")
            copy_gbps = copy_baseline(args.device, logical, args.repeats)
            kernels = kernel_baseline(args.codec_gpu, codec, logical, tmp) if args.device == "cuda" else None
            for n in args.workers:
                cfg = dict(device=args.device, blocks=blocks, socket=str(daemon.socket), shape=args.shape,
                           model_id=model_id, codec=codec, seconds=args.seconds)  # fmt: skip
                start = ctx.Barrier(n + 1)
                results = ctx.Queue()
                procs = [ctx.Process(target=worker, args=(i, cfg, start, results)) for i in range(n)]
                for p in procs:
                    p.start()
                start.wait(timeout=600)  # all set up: gets begin
                start.wait(timeout=600 + args.seconds)  # gets done: puts begin
                got = [results.get(timeout=600 + args.seconds) for _ in procs]
                for p in procs:
                    p.join(timeout=60)
                    if p.exitcode != 0:
                        raise SystemExit(f"serve_gpu.py: a worker exited with {p.exitcode}")
                gets = [t for r in got for t in r["gets"]]
                puts = [t for r in got for t in r["puts"]]
                rows.append(
                    dict(
                        codec=model.codec,
                        logical_bytes=logical,
                        blocks=blocks,
                        workers=n,
                        gets=len(gets),
                        get_gbps=logical * len(gets) / max(r["get_wall"] for r in got) / 1e9,
                        get_p50_ms=quantile(gets, 0.5) * 1e3,
                        get_p99_ms=quantile(gets, 0.99) * 1e3,
                        puts=len(puts),
                        put_gbps=logical * len(puts) / max(max(r["put_wall"] for r in got), 1e-9) / 1e9,
                        put_p50_ms=quantile(puts, 0.5) * 1e3,
                        put_p99_ms=quantile(puts, 0.99) * 1e3,
                        copy_gbps=copy_gbps,
                        kernel_decode_gbps=None if kernels is None else kernels["decode_gbps"],
                        kernel_encode_gbps=None if kernels is None else kernels["encode_gbps"],
                    )
                )
        client.close()
    finally:
        daemon.stop()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    restore.common_args(ap)
    ap.add_argument("--codecs", default="fp16,kivi4")
    ap.add_argument("--sizes", default="16M,64M,256M,1G", help="logical KV bytes a request moves")
    ap.add_argument("--workers", default="1,8")
    ap.add_argument("--seconds", type=float, default=3.0, help="per phase (gets, puts) and worker count")
    ap.add_argument("--repeats", type=int, default=5, help="of the copy baseline")
    ap.add_argument("--codec-gpu", default=str(restore.BUILD / "bench" / "codec_gpu"))
    args = ap.parse_args()
    try:
        args.sizes = [parse_size(s) for s in args.sizes.split(",")]
        args.workers = [int(w) for w in args.workers.split(",")]
    except (ValueError, KeyError):
        ap.error("--sizes: sizes like 16M,1G; --workers: integers")
    if any(w < 1 for w in args.workers) or args.seconds <= 0 or args.repeats < 1:
        ap.error("--workers at least 1, --seconds positive, --repeats at least 1")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("serve_gpu.py: no CUDA device (use --device cpu for a check of the script)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="vqkv-serve-gpu.") as tmp:
        for codec in args.codecs.split(","):
            rows += run_codec(args, codec, tmp)
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    print(f"gets and puts through vqkvd: {args.shape}, {where}, {args.seconds:g} s a phase")
    print(f"{'codec':<12} {'MiB':>7} {'workers':>7} {'get GB/s':>9} {'get p50/p99 ms':>16} {'put GB/s':>9} "
          f"{'put p50/p99 ms':>16} {'copy GB/s':>10} {'kernel dec/enc GB/s':>20}")  # fmt: skip
    for r in rows:
        kern = "-" if r["kernel_decode_gbps"] is None else f"{r['kernel_decode_gbps']:.1f}/{r['kernel_encode_gbps']:.1f}"
        print(f"{r['codec'][:12]:<12} {r['logical_bytes'] / (1 << 20):>7.2f} {r['workers']:>7} {r['get_gbps']:>9.2f} "
              f"{r['get_p50_ms']:>7.2f}/{r['get_p99_ms']:<8.2f} {r['put_gbps']:>9.2f} "
              f"{r['put_p50_ms']:>7.2f}/{r['put_p99_ms']:<8.2f} {r['copy_gbps']:>10.1f} {kern:>20}")  # fmt: skip
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(bench="serve_gpu", shape=args.shape, device=where, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
