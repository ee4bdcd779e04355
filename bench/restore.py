#!/usr/bin/env python3
"""restore.py -- restoring a prefix's KV cache through vqkvd against recomputing it.

The headline figure of the GPU path: for a Llama-3-8B-shaped model (32
layers, hidden 4096, 32 query heads and 8 kv heads of 128 channels, MLP
14336, vocabulary 128256, RoPE base 500000) with random fp16 weights, since
a prefill's time does not depend on the values, and for each prefix length:

  prefill   the forward pass over the prefix that an engine runs when it has
            no cache: every layer's K and V written into a paged cache, and
            the last token's logits (PyTorch, scaled-dot-product attention).
  restore   the same prefix's blocks brought back by vqkvd into another paged
            cache of the same process, after a put of the prefill's blocks:
            the lookup of the prefix's block keys and one get, until the
            cache holds them (on a GPU the get returns at once with an event
            the worker's stream waits on, then the stream is synchronized).
  copy      the same bytes copied from cache to cache by the device
            (cudaMemcpy device to device on a GPU, memcpy on the CPU): what
            a restore of uncompressed blocks could at best cost.

Each figure is the median of --repeats runs after a warm-up run. The restored
blocks are compared with the prefill's: equal byte for byte for fp16, a
relative error for a lossy codec. Prints a table and writes JSON.

The script starts its own vqkvd (the build's, or --vqkvd) on a socket in a
temporary directory, on cuda:0 or the CPU, with a pool that holds the
longest prefix. A VQ codec is calibrated first on --warmup-tokens of other
random KV, which vqkvd stores fp16 until its codebooks are trained.

    .venv/bin/python bench/restore.py --json bench/out/restore.json
    .venv/bin/python bench/restore.py --device cpu --shape tiny --tokens 64,256   # no GPU

Needs torch and numpy, and the vqkv package (client/python, found from the
checkout) with this build's libvqkv.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / os.environ.get("VQKV_BUILD_DIR", "build")
sys.path.insert(0, str(ROOT / "client" / "python" / "src"))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402
from daemon_harness import Daemon  # noqa: E402

import vqkv  # noqa: E402

# The shapes a run can take: the headline one, and one small enough for a
# CPU to check the script itself.
SHAPES = {
    "llama3-8b": dict(
        layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128, mlp=14336, vocab=128256, theta=500000.0
    ),
    "tiny": dict(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, mlp=128, vocab=512, theta=10000.0),
}
BLOCK_TOKENS = 16


class Llama:
    """A Llama decoder with random weights, enough for a prefill's cost."""

    def __init__(self, shape: dict[str, Any], device: str, dtype: Any, seed: int) -> None:
        import torch

        self.s = shape
        g = torch.Generator(device=device).manual_seed(seed)
        h, hd = shape["hidden"], shape["head_dim"]

        def w(*dims: int) -> Any:
            # 1/sqrt(fan-in): activations stay near unit scale through the layers.
            return (torch.randn(*dims, generator=g, device=device) / math.sqrt(dims[-1])).to(dtype)

        self.embed = w(shape["vocab"], h)
        self.layers = [
            dict(
                wq=w(shape["heads"] * hd, h),
                wk=w(shape["kv_heads"] * hd, h),
                wv=w(shape["kv_heads"] * hd, h),
                wo=w(h, shape["heads"] * hd),
                wg=w(shape["mlp"], h),
                wu=w(shape["mlp"], h),
                wd=w(h, shape["mlp"]),
            )
            for _ in range(shape["layers"])
        ]
        self.head = w(shape["vocab"], h)

    def _rope(self, n: int, device: str) -> tuple[Any, Any]:
        import torch

        hd = self.s["head_dim"]
        inv = 1.0 / (self.s["theta"] ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd))
        ang = torch.outer(torch.arange(n, device=device, dtype=torch.float32), inv)
        return torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)

    @staticmethod
    def _turn(x: Any, cos: Any, sin: Any) -> Any:
        """Rotate-half RoPE, as Hugging Face's Llama and vLLM cache keys."""
        import torch

        half = x.shape[-1] // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], -1)
        return (x.float() * cos[:, None, :] + rot.float() * sin[:, None, :]).to(x.dtype)

    def prefill(self, ids: Any, cache: Any, slots: list[int]) -> Any:
        """Runs the prefix, writes each layer's K and V into cache (vLLM's
        [layers][2][slot][token][kv head][dim]) at slots, returns the last
        token's logits."""
        import torch
        import torch.nn.functional as F

        n, hd, kvh = ids.shape[0], self.s["head_dim"], self.s["kv_heads"]
        cos, sin = self._rope(n, str(ids.device))
        x = self.embed[ids]
        idx = torch.tensor(slots, device=ids.device)
        for li, p in enumerate(self.layers):
            a = F.rms_norm(x, (x.shape[-1],))
            q = self._turn((a @ p["wq"].T).view(n, -1, hd), cos, sin)
            k = self._turn((a @ p["wk"].T).view(n, kvh, hd), cos, sin)
            v = (a @ p["wv"].T).view(n, kvh, hd)
            cache[li, 0].index_copy_(0, idx, k.view(-1, BLOCK_TOKENS, kvh, hd))
            cache[li, 1].index_copy_(0, idx, v.view(-1, BLOCK_TOKENS, kvh, hd))
            o = F.scaled_dot_product_attention(
                q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, enable_gqa=True
            )
            x = x + o.transpose(0, 1).reshape(n, -1) @ p["wo"].T
            a = F.rms_norm(x, (x.shape[-1],))
            x = x + (F.silu(a @ p["wg"].T) * (a @ p["wu"].T)) @ p["wd"].T
        return F.rms_norm(x[-1:], (x.shape[-1],)) @ self.head.T


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def timed(device: str, fn: Any) -> float:
    """Seconds fn takes, the device's queued work included."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def median_of(device: str, fn: Any, repeats: int) -> float:
    timed(device, fn)  # warm-up: allocator, kernels, the daemon's first touch
    return statistics.median(timed(device, fn) for _ in range(repeats))


def start_vqkvd(binary: str, device: str, pool_bytes: int, calibration_tokens: int, tmp: str) -> Daemon:
    """vqkvd on tmp/vqkv.sock (tests/daemon_harness.py: an empty config, a
    state dir there, dying with this process), on cuda:0 or the CPU."""
    return Daemon(binary, tmp, "--device", "cuda:0" if device == "cuda" else "cpu", "--log-level", "warn",
                  "--calibration-tokens", str(calibration_tokens), pool_bytes=pool_bytes)  # fmt: skip


class Cache:
    """A paged KV cache in vLLM's layout, [layers][2][slot][token][kv head][dim],
    registered with vqkvd: a CUDA tensor on a GPU, a memfd on the CPU."""

    def __init__(self, client: vqkv.Client, model: vqkv.Model, layout: vqkv.Layout, slots: int, device: str):
        import torch

        shape = (layout.num_layers, 2, slots, layout.block_tokens, layout.num_kv_heads, layout.head_dim)
        self.memfd = None
        if device == "cuda":
            self.tensor = torch.zeros(shape, dtype=torch.float16, device="cuda")
            self.region = client.register_cuda_tensor(model, self.tensor)
        else:
            self.memfd = vqkv.KVCache.create(layout, slots)
            self.tensor = self.memfd.tensor().view(shape)
            self.region = client.register_cache(model, self.memfd)


def get_into(client: vqkv.Client, model: vqkv.Model, keys: Any, cache: Cache, slots: list[int], device: str) -> None:
    """Looks keys up and gets every block into cache's slots; on a GPU the
    get returns with an event that the current stream then waits on."""
    import torch

    with client.lookup(model, keys) as lease:
        if lease.found != len(slots):
            raise SystemExit(f"{sys.argv[0]}: {lease.found} of {len(slots)} blocks found")
        if device == "cuda":
            event = torch.cuda.Event(interprocess=True)
            lease.get(cache.region, slots, event=event)
            torch.cuda.current_stream().wait_event(event)
        else:
            lease.get(cache.region, slots)


def warm_up_codec(client: vqkv.Client, model: vqkv.Model, cache: Cache, tokens: int, device: str) -> vqkv.Model:
    """Puts `tokens` of other random KV for vqkvd to calibrate a VQ codec on,
    waits for its codebooks, then evicts those blocks; the model as
    registered again once they are there."""
    import torch

    rng = np.random.default_rng(7)
    left = tokens // BLOCK_TOKENS
    while left > 0:  # in chunks of the cache's slots, each a sequence of its own
        blocks = min(left, cache.tensor.shape[2])
        cache.tensor[:, :, :blocks].copy_(torch.randn_like(cache.tensor[:, :, :blocks], dtype=torch.float32))
        sync(device)
        ids = rng.integers(1, 1 << 30, size=blocks * BLOCK_TOKENS, dtype=np.uint32)
        client.put(model, cache.region, model.block_keys(ids), list(range(blocks)))
        left -= blocks
    deadline = time.monotonic() + 1800
    while not model.codebooks_ready:
        if time.monotonic() > deadline:
            raise SystemExit("restore.py: vqkvd trained no codebooks in 30 minutes")
        time.sleep(0.2)
        model = client.register_model(model.model_id, model.layout, model.codec)
    client.evict(model, all=True)
    return model


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    device, shape = args.device, SHAPES[args.shape]
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("restore.py: no CUDA device (use --device cpu for a check of the script)")
    layout = vqkv.Layout(shape["layers"], shape["kv_heads"], shape["head_dim"], BLOCK_TOKENS, vqkv.DType.F16)
    most = max(args.tokens)
    slots = most // BLOCK_TOKENS
    # The longest prefix and the warm-up, both stored fp16 at worst.
    pool = int(layout.block_bytes * (slots + args.warmup_tokens // BLOCK_TOKENS) * 1.25) + (64 << 20)
    rows = []
    with tempfile.TemporaryDirectory(prefix="vqkv-restore.") as tmp:
        daemon = start_vqkvd(args.vqkvd, device, pool, args.warmup_tokens, tmp)
        try:
            client = vqkv.Client(str(daemon.socket), name="restore", timeout_ms=600_000)
            model = client.register_model(f"bench/restore-{args.shape}", layout, args.codec)
            model_dtype = torch.float16
            llama = Llama(shape, device, model_dtype, seed=1)
            src = Cache(client, model, layout, slots, device)
            dst = Cache(client, model, layout, slots, device)
            if not model.codebooks_ready:
                model = warm_up_codec(client, model, src, args.warmup_tokens, device)
            rng = np.random.default_rng(11)
            for n in sorted(args.tokens):
                blocks = n // BLOCK_TOKENS
                ids = rng.integers(1, shape["vocab"], size=n, dtype=np.int64)
                tid = torch.from_numpy(ids).to(device)
                used = list(range(blocks))
                with torch.inference_mode():
                    prefill_s = median_of(device, lambda: llama.prefill(tid, src.tensor, used), args.repeats)
                keys = model.block_keys(ids.astype(np.uint32))
                client.evict(model, all=True)
                t0 = time.perf_counter()
                put = client.put(model, src.region, keys, used)
                put_s = time.perf_counter() - t0
                if put.stored != blocks:
                    raise SystemExit(f"restore.py: {put.stored} of {blocks} blocks stored: {put.statuses[:4]}")

                def restore() -> None:
                    get_into(client, model, keys, dst, used, device)

                restore_s = median_of(device, restore, args.repeats)
                copy_s = median_of(device, lambda: dst.tensor[:, :, :blocks].copy_(src.tensor[:, :, :blocks]),
                                   args.repeats)  # fmt: skip
                dst.tensor[:, :, :blocks].zero_()
                restore()
                sync(device)
                a, b = src.tensor[:, :, :blocks], dst.tensor[:, :, :blocks]
                exact = bool(torch.equal(a.view(torch.int16), b.view(torch.int16)))
                err = float((a.float() - b.float()).norm() / a.float().norm().clamp_min(1e-30))
                logical = blocks * layout.block_bytes
                rows.append(
                    dict(
                        tokens=n,
                        blocks=blocks,
                        logical_bytes=logical,
                        prefill_ms=prefill_s * 1e3,
                        restore_ms=restore_s * 1e3,
                        put_ms=put_s * 1e3,
                        copy_ms=copy_s * 1e3,
                        restore_gbps=logical / restore_s / 1e9,
                        copy_gbps=logical / copy_s / 1e9,
                        speedup=prefill_s / restore_s,
                        exact=exact,
                        rel_error=err,
                    )
                )
            client.close()
        finally:
            daemon.stop()
    return rows


def common_args(ap: argparse.ArgumentParser) -> None:
    """The options this script and serve_gpu.py share."""
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--warmup-tokens", type=int, default=2048, help="calibration for a VQ codec")
    ap.add_argument("--vqkvd", default=str(BUILD / "daemon" / "vqkvd"))
    ap.add_argument("--json")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common_args(ap)
    ap.add_argument("--tokens", default="4096,16384,32768", help="prefix lengths, multiples of 16")
    ap.add_argument("--codec", default="fp16")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    try:
        args.tokens = [int(t) for t in args.tokens.split(",")]
    except ValueError:
        ap.error("--tokens: comma-separated integers")
    if any(t <= 0 or t % BLOCK_TOKENS for t in args.tokens) or args.repeats < 1:
        ap.error(f"--tokens must be positive multiples of {BLOCK_TOKENS}; --repeats at least 1")
    rows = run(args)
    import torch

    where = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    print(f"restore vs recompute: {args.shape}, codec {args.codec}, {where}, median of {args.repeats}")
    print(f"{'tokens':>7} {'prefill ms':>11} {'restore ms':>11} {'speedup':>8} {'restore GB/s':>13} "
          f"{'copy GB/s':>10} {'put ms':>8} {'exact':>6} {'rel err':>8}")  # fmt: skip
    for r in rows:
        print(f"{r['tokens']:>7} {r['prefill_ms']:>11.1f} {r['restore_ms']:>11.2f} {r['speedup']:>7.1f}x "
              f"{r['restore_gbps']:>13.2f} {r['copy_gbps']:>10.2f} {r['put_ms']:>8.1f} {str(r['exact']):>6} "
              f"{r['rel_error']:>8.4f}")  # fmt: skip
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps(dict(bench="restore", shape=args.shape, codec=args.codec, device=where, rows=rows), indent=1)
        )
    if args.codec == "fp16" and not all(r["exact"] for r in rows):
        print("restore.py: fp16 blocks did not come back byte for byte", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
