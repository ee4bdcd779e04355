#!/usr/bin/env python3
"""remote.py -- cross-node restore through vqkvd's remote tier, against fp16 from the same Redis.

Two vqkvd ("node A" and "node B", each with its own socket, pool and state
directory, one shared salt secret) share one redis-server on loopback TCP.
For each shape (SmolLM2-135M: 30 layers, 3 kv heads, head_dim 64; and
Llama-3-8B: 32 layers, 8 kv heads, head_dim 128; 16-token blocks, fp16 KV)
and each codec asked (fp16, kivi4 and rvq by default; rvq is calibrated
online by node A on its first ``--calib-tokens`` tokens and adopted by node B
from Redis), node A puts a ``--tokens``-token prefix (random values) and
waits until Redis has acknowledged every block. Then ``--reps`` times: node B
drops the prefix from its memory (Evict), and a worker on B times a lookup of
the whole chain (which fetches every block from Redis into B's pool) and a
get into its own memfd cache. Reported: GB/s of fp16 (logical) KV restored,
the restore's p50 and p99 latency, and the bytes Redis sent per token
(node B's counter).

The baseline, in the same run, from the same Redis: the same prefix's fp16
bytes stored as one value per block (what an uncompressed remote tier holds),
fetched by one pipelined GET per block over one connection and read straight
into a preallocated buffer (socket.recv_into, the reply lengths known in
advance, so no parsing: the fastest a client can take them off the wire).

    bench/remote.py [--json OUT] [--tokens 4096] [--reps 5]
                    [--codecs fp16,kivi4,rvq] [--shapes smollm2,llama3-8b]

``--vqkvd`` and ``--lib`` default to the checkout's ``build/daemon/vqkvd``
and ``build/client/libvqkv.so``. Needs numpy and redis-server. About two
minutes with the defaults on a 2-core machine (the Llama-3-8B prefix is
512 MiB of fp16).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "client" / "python" / "src"))
sys.path.insert(0, str(ROOT / "tests"))

SHAPES = {
    "smollm2": dict(num_layers=30, num_kv_heads=3, head_dim=64),
    "llama3-8b": dict(num_layers=32, num_kv_heads=8, head_dim=128),
}
BLOCK_TOKENS = 16


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, cond, guard: float = 600) -> None:
    deadline = time.monotonic() + guard
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


class Redis:
    """redis-server on a loopback port; a raw RESP connection for the baseline."""

    def __init__(self, work: Path) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(work), "--proto-max-bulk-len", "1gb"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for("redis-server", self._answers, 30)
        self.sock = socket.create_connection(("127.0.0.1", self.port))

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port)) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    @staticmethod
    def command(*args: bytes) -> bytes:
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            out.append(b"$%d\r\n%s\r\n" % (len(a), a))
        return b"".join(out)

    def call_many(self, commands: list[bytes], reply_bytes: int, into: memoryview) -> None:
        """Sends commands pipelined and reads exactly reply_bytes of replies into into."""
        self.sock.sendall(b"".join(commands))
        got = 0
        while got < reply_bytes:
            n = self.sock.recv_into(into[got:reply_bytes])
            if n == 0:
                raise ConnectionError("redis-server closed the connection")
            got += n

    def flushall(self) -> None:
        buf = bytearray(16)
        self.call_many([self.command(b"FLUSHALL")], 5, memoryview(buf))

    def stop(self) -> None:
        self.sock.close()
        self.proc.kill()
        self.proc.wait()


class Node:
    def __init__(self, vqkvd: str, work: Path, name: str, remote: str, secret: Path,
                 pool_bytes: int, calib_tokens: int) -> None:
        from daemon_harness import Daemon
        d = work / name
        d.mkdir()
        self.daemon = Daemon(vqkvd, d, config_text=(
            f"[vqkvd]\nremote = {remote}\nsalt_secret_file = {secret}\n"
            f"metrics_address = 127.0.0.1:0\ncalibration_tokens = {calib_tokens}\n"
            "remote_lookup_ms = 30000\nremote_queue_bytes = 4G\nstaging_bytes = 0\n"),
            pool_bytes=pool_bytes)
        self.socket = str(self.daemon.socket)
        wait_for("the metrics endpoint", self.daemon.found_metrics_url, 60)
        self.url = self.daemon.url

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(self.url + "/metrics", timeout=60) as r:
            text = r.read().decode()
        return float(re.search(rf"^vqkv_remote_{name} (\S+)$", text, re.M).group(1))

    def stop(self) -> None:
        self.daemon.stop()


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def bench_codec(args, a: Node, b: Node, layout, shape: str, codec: str) -> dict[str, Any]:
    import numpy as np
    import vqkv
    blocks = args.tokens // BLOCK_TOKENS
    model_id = f"bench/{shape}"
    ca = vqkv.Client(a.socket, timeout_ms=600000)
    cb = vqkv.Client(b.socket, timeout_ms=600000)
    ma = ca.register_model(model_id, layout, codec)
    cache = vqkv.KVCache.create(layout, blocks)
    rng = np.random.default_rng(1)
    for layer in range(layout.num_layers):  # a layer at a time: no 2 GiB float64 temporary
        cache.array[layer] = rng.standard_normal(cache.array[layer].shape).astype(
            cache.array.dtype)
    ra = ca.register_cache(ma, cache)
    stored0 = a.metric("puts_stored_total")
    if not ma.codebooks_ready:  # rvq: A calibrates on its first blocks, then B adopts
        calib = -(-args.calib_tokens // BLOCK_TOKENS)
        ca.put(ma, ra, ma.block_keys(list(range(10**6, 10**6 + calib * BLOCK_TOKENS))),
               range(calib))
        wait_for("A's codebooks", lambda: ca.register_model(model_id, layout, codec)
                 .codebooks_ready)
        stored0 = a.metric("puts_stored_total") + calib  # its fp16 blocks, then re-encoded
        mb = cb.register_model(model_id, layout, codec)
        wait_for("B adopting them", lambda: cb.register_model(model_id, layout, codec)
                 .codebooks_ready)
    tokens = list(range(args.tokens))
    keys = ma.block_keys(tokens)
    ca.put(ma, ra, keys, range(blocks))
    wait_for("Redis storing every block", lambda: a.metric("puts_stored_total") >= stored0 + blocks)
    mb = cb.register_model(model_id, layout, codec)
    rb_cache = vqkv.KVCache.create(layout, blocks)
    rb = cb.register_cache(mb, rb_cache)
    logical = blocks * layout.block_bytes
    times, wire = [], []
    for rep in range(args.reps):
        cb.evict(mb, all=True)
        fetched0 = b.metric("fetched_bytes_total")
        t0 = time.perf_counter()
        with cb.lookup(mb, keys) as lease:
            assert lease.found == blocks, f"{codec}: B found {lease.found} of {blocks}"
            lease.get(rb, range(blocks))
        times.append(time.perf_counter() - t0)
        wire.append(b.metric("fetched_bytes_total") - fetched0)
        if codec == "fp16":
            assert np.array_equal(rb_cache.array, cache.array), "fp16 must restore byte for byte"
    err = float(np.abs(rb_cache.array.astype(np.float32) - cache.array.astype(np.float32)).mean())
    ca.close()
    cb.close()
    med = statistics.median(times)
    return dict(shape=shape, codec=codec, blocks=blocks, logical_bytes=logical,
                restore_s=times, gbps=logical / med / 1e9, p50_ms=med * 1e3,
                p99_ms=pct(times, 99) * 1e3, wire_bytes_per_token=statistics.median(wire) /
                args.tokens, mean_abs_error=err)


def bench_fp16_baseline(args, r: Redis, layout, shape: str) -> dict[str, Any]:
    import numpy as np
    blocks = args.tokens // BLOCK_TOKENS
    block = layout.block_bytes
    rng = np.random.default_rng(2)
    value = rng.integers(0, 256, block, dtype=np.uint8).tobytes()
    names = [b"fp16:%s:%d" % (shape.encode(), i) for i in range(blocks)]
    buf = bytearray(16 * blocks)
    r.call_many([r.command(b"SET", n, value) for n in names], 5 * blocks, memoryview(buf))
    header = b"$%d\r\n" % block
    reply = blocks * (len(header) + block + 2)
    into = memoryview(bytearray(reply))
    gets = [r.command(b"GET", n) for n in names]
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        r.call_many(gets, reply, into)
        times.append(time.perf_counter() - t0)
        assert into[:len(header)] == header
    r.flushall()
    med = statistics.median(times)
    logical = blocks * block
    return dict(shape=shape, codec="fp16 GET (baseline)", blocks=blocks, logical_bytes=logical,
                restore_s=times, gbps=logical / med / 1e9, p50_ms=med * 1e3,
                p99_ms=pct(times, 99) * 1e3, wire_bytes_per_token=reply / args.tokens,
                mean_abs_error=0.0)


def table(rows: list[dict[str, Any]]) -> str:
    head = ["shape", "codec", "GB/s restored", "p50 ms", "p99 ms", "bytes/token on the wire",
            "vs fp16 GET"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = {r["shape"]: r["gbps"] for r in rows if "baseline" in r["codec"]}
    for r in rows:
        out.append("| " + " | ".join([
            r["shape"], r["codec"], f"{r['gbps']:.2f}", f"{r['p50_ms']:.1f}",
            f"{r['p99_ms']:.1f}", f"{r['wire_bytes_per_token']:.0f}",
            f"{r['gbps'] / base[r['shape']]:.2f}x"]) + " |")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vqkvd", default=str(ROOT / "build" / "daemon" / "vqkvd"))
    p.add_argument("--lib", default=str(ROOT / "build" / "client" / "libvqkv.so"))
    p.add_argument("--json")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--calib-tokens", type=int, default=256)
    p.add_argument("--codecs", default="fp16,kivi4,rvq")
    p.add_argument("--shapes", default="smollm2,llama3-8b")
    args = p.parse_args()
    os.environ.setdefault("VQKV_LIBRARY", args.lib)
    import vqkv
    if shutil.which("redis-server") is None:
        log("SKIPPED: redis-server is missing")
        return 77
    rows = []
    with tempfile.TemporaryDirectory(prefix="vqkv-remote.") as tmp:
        work = Path(tmp)
        secret = work / "salt-secret"
        secret.write_bytes(os.urandom(32))
        secret.chmod(0o600)
        for shape in args.shapes.split(","):
            layout = vqkv.Layout(block_tokens=BLOCK_TOKENS, **SHAPES[shape])
            pool = max(64 << 20, 2 * (args.tokens // BLOCK_TOKENS) * layout.block_bytes)
            for codec in args.codecs.split(","):
                # A fresh Redis and fresh nodes per codec: nothing cached from the last.
                r = Redis(work)
                remote = f"redis://127.0.0.1:{r.port}"
                a = Node(args.vqkvd, work, f"a-{shape}-{codec}", remote, secret, pool,
                         args.calib_tokens)
                b = Node(args.vqkvd, work, f"b-{shape}-{codec}", remote, secret, pool,
                         args.calib_tokens)
                try:
                    wait_for("nodes up", lambda: a.metric("up") == 1 and b.metric("up") == 1)
                    if codec == args.codecs.split(",")[0]:
                        rows.append(bench_fp16_baseline(args, r, layout, shape))
                        log(f"{shape} fp16 GET baseline: {rows[-1]['gbps']:.2f} GB/s")
                    rows.append(bench_codec(args, a, b, layout, shape, codec))
                    log(f"{shape} {codec}: {rows[-1]['gbps']:.2f} GB/s")
                finally:
                    a.stop()
                    b.stop()
                    r.stop()
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(
            machine=dict(nproc=os.cpu_count(), platform=platform.platform(),
                         redis=subprocess.run(["redis-server", "--version"], capture_output=True,
                                              text=True).stdout.strip()),
            tokens=args.tokens, reps=args.reps, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
