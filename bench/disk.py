#!/usr/bin/env python3
"""disk.py -- vqkvd's disk tier: restore from disk, and restart time against blocks held.

Part 1, restore. A fresh vqkvd (``--disk-dir``) gets a SmolLM2-135M-shaped
model (30 layers, 3 kv heads, head_dim 64, 16-token blocks, fp16 KV) with
each codec asked (``fp16`` and ``kivi4`` by default) and one chain of
``--blocks`` random blocks put from a worker's memfd cache. SIGTERM makes it
write what memory holds to its segment files and exit 0; then, ``--reps``
times: vqkvd restarts on the same directories (empty memory, the index
rebuilt from the segments' headers), every segment file is fsync'ed and its
page cache dropped (``posix_fadvise(DONTNEED)``), and a new worker times a
lookup of the whole chain (which reads every block back from disk into the
pool: a Promote) and a get of it into its own memory. The figure is GB/s of
fp16 (logical) bytes restored, median of the reps. fp16 must come back
byte for byte; kivi4 must come back the same in every rep (its error
against the original is reported). The baseline, in the same rep, on the
same directory: the same fp16 bytes in a plain file, fsync'ed, page cache
dropped, read back with ``readinto`` into a numpy buffer.

Part 2, restart time. A one-layer, one-head, head_dim 16, 1-token fp16
layout (64-byte blocks) so that many blocks are cheap: ``--restart-blocks``
M blocks (and M/4, to show the scaling), put as chains of
``--chain-blocks``; SIGTERM; then vqkvd restarts ``--reps`` times with the
segments' page cache dropped (cold) and ``--reps`` times without (warm).
Reported: the index rebuild time vqkvd logs at start
(``disk: DIR: B blocks in S segments, ... (X ms)``), the time from spawn
until its socket accepts a connection, and both per million blocks.

Run from anywhere, after the build (nothing is built here):

    bench/disk.py [--dir DIR] [--json OUT] [--blocks 256] [--reps 5]
                  [--restart-blocks 200000] [--codecs fp16,kivi4]

``--dir`` is where the work directory goes (on the disk to measure; default
a temporary directory under /var/tmp, not /tmp, which may be tmpfs); it is
removed afterwards. ``--vqkvd`` and ``--lib`` default to the checkout's
``build/daemon/vqkvd`` and ``build/client/libvqkv.so``. Prints Markdown
tables and, with ``--json OUT``, writes the figures, every rep and the
machine's facts (nproc, the filesystem and its block device). Needs numpy
and Linux (posix_fadvise, memfd). Under a minute with the defaults on a
2-core machine.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "client" / "python" / "src"))

# vqkvd's start-up line for the disk tier (daemon/tiers.c).
DISK_LINE = re.compile(
    r"disk: (?P<dir>.*): (?P<blocks>\d+) blocks in (?P<segments>\d+) segments, "
    r"(?P<bytes>\d+) of (?P<limit>\d+) bytes \((?P<ms>[0-9.]+) ms\)"
)
# A guard against a daemon that hangs, never a timing check.
HANG_GUARD_S = 120
_PR_SET_PDEATHSIG = 1


def log(msg: str) -> None:
    print(f"disk.py: {msg}", file=sys.stderr, flush=True)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the benchmark goes, so no daemon is left behind."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class Daemon:
    """vqkvd with a disk tier on fixed directories, started and stopped as often as asked."""

    def __init__(self, vqkvd: str, work: Path, sock: Path, pool_bytes: int) -> None:
        self.vqkvd = vqkvd
        self.work = work
        self.sock = sock
        self.pool_bytes = pool_bytes
        self.disk_dir = work / "disk"
        self.state_dir = work / "state"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.log_path = work / "vqkvd-0.log"

    def start(self) -> dict[str, Any]:
        """Starts vqkvd and waits until its socket accepts; returns the start's timings."""
        assert self.proc is None
        self.sock.unlink(missing_ok=True)
        self.log_path = self.work / f"vqkvd-{self.starts}.log"
        self.starts += 1
        with open(self.log_path, "wb") as err:
            t0 = time.perf_counter()
            self.proc = subprocess.Popen(
                [
                    self.vqkvd,
                    "--config", "/dev/null",
                    "--socket", str(self.sock),
                    "--state-dir", str(self.state_dir),
                    "--disk-dir", str(self.disk_dir),
                    "--pool-bytes", str(self.pool_bytes),
                    "--device", "cpu",
                    "--log-level", "info",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                preexec_fn=_die_with_parent,
            )
        deadline = t0 + HANG_GUARD_S
        while True:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(str(self.sock))
                    break
                except OSError:
                    pass
            if self.proc.poll() is not None:
                raise SystemExit(f"disk.py: vqkvd exited at start:\n{self.log_path.read_text()}")
            if time.perf_counter() > deadline:
                raise SystemExit(f"disk.py: vqkvd did not start:\n{self.log_path.read_text()}")
            time.sleep(0.002)
        accept_ms = (time.perf_counter() - t0) * 1e3
        m = None
        for line in self.log_path.read_text(errors="replace").splitlines():
            m = DISK_LINE.search(line) or m
        if m is None:
            raise SystemExit(f"disk.py: no 'disk:' line in vqkvd's log:\n{self.log_path.read_text()}")
        return {
            "accept_ms": accept_ms,
            "rebuild_ms": float(m["ms"]),
            "blocks": int(m["blocks"]),
            "segments": int(m["segments"]),
            "segment_bytes": int(m["bytes"]),
        }

    def stop(self) -> float:
        """SIGTERM, and exit status 0 wanted; returns how long the stop took, in ms."""
        assert self.proc is not None
        t0 = time.perf_counter()
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(HANG_GUARD_S)
        ms = (time.perf_counter() - t0) * 1e3
        self.proc = None
        if rc != 0:
            raise SystemExit(f"disk.py: vqkvd exited with {rc}:\n{self.log_path.read_text()}")
        return ms

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def segments(self) -> list[Path]:
        return sorted(self.disk_dir.glob("seg-*.vqs"))


def drop_cache(paths: list[Path]) -> None:
    """Writes back and drops the page cache of these files (DONTNEED drops clean pages only)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_bytes(paths: list[Path]) -> int | None:
    """Bytes of these files in the page cache (util-linux fincore), None without fincore."""
    if not paths or shutil.which("fincore") is None:
        return None
    try:
        out = subprocess.run(
            ["fincore", "--bytes", "--noheadings", "--output", "RES", *map(str, paths)],
            check=True, capture_output=True, text=True,
        ).stdout
        return sum(int(x) for x in out.split())
    except (subprocess.CalledProcessError, ValueError):
        return None


def read_file_into(path: Path, buf: np.ndarray) -> int:
    """Reads the whole file into buf with readinto; returns the bytes read."""
    view = buf.data.cast("B")
    got = 0
    with open(path, "rb", buffering=0) as f:
        while got < len(view):
            n = f.readinto(view[got:])
            if not n:
                break
            got += n
    return got


def machine_facts(where: Path) -> dict[str, Any]:
    """nproc, the CPU, the filesystem of ``where`` and the block device under it, as far as known."""
    facts: dict[str, Any] = {"nproc": os.cpu_count(), "machine": platform.machine(),
                             "kernel": platform.release()}
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                facts["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        facts["fs_type"] = subprocess.run(["stat", "-f", "-c", "%T", str(where)], check=True,
                                          capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        facts["fs_type"] = None
    if shutil.which("findmnt"):
        r = subprocess.run(["findmnt", "-n", "-o", "SOURCE,FSTYPE,TARGET", "--target", str(where)],
                           capture_output=True, text=True)
        parts = r.stdout.split()
        if r.returncode == 0 and len(parts) >= 3:
            facts["mount_source"], facts["mount_fstype"], facts["mount_point"] = parts[:3]
    st = os.stat(where)
    sysdev = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    if sysdev.exists():
        dev = sysdev.resolve()
        disk = dev.parent if (dev / "partition").exists() else dev
        facts["block_device"] = dev.name
        facts["disk"] = disk.name
        for key, rel in (("rotational", "queue/rotational"), ("scheduler", "queue/scheduler"),
                         ("model", "device/model"), ("vendor", "device/vendor")):
            try:
                facts[key] = (disk / rel).read_text().strip()
            except OSError:
                pass
        try:
            facts["disk_bytes"] = int((disk / "size").read_text()) * 512
        except (OSError, ValueError):
            pass
    return facts


# ---- part 1: restore from disk -------------------------------------------------------


def bench_restore(args: argparse.Namespace, work: Path, sock: Path, codec: str) -> dict[str, Any]:
    import vqkv

    layout = vqkv.Layout(num_layers=30, num_kv_heads=3, head_dim=64, block_tokens=16)
    n = args.blocks
    logical = n * layout.block_bytes
    pool = args.pool_bytes or max(256 << 20, 2 * logical + (64 << 20))
    d = Daemon(args.vqkvd, work, sock, pool)
    model_id = f"bench/smollm2-135m-shape@{codec}"
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 49152, size=n * layout.block_tokens, dtype=np.uint32)

    log(f"restore {codec}: {n} blocks, {logical / 1e6:.1f} MB of fp16, pool {pool >> 20} MiB")
    d.start()
    try:
        with vqkv.Client(str(sock), name="disk.py", timeout_ms=120000) as c:
            model = c.register_model(model_id, layout, codec)
            src = vqkv.KVCache.create(layout, n, name="disk.py-src")
            src.array[...] = rng.standard_normal(src.array.shape, dtype=np.float32).astype(np.float16)
            region = c.register_cache(model, src)
            keys = model.block_keys(tokens)
            res = c.put(model, region, keys, slots=range(n))
            if res.stored != n:
                raise SystemExit(f"disk.py: put stored {res.stored} of {n} blocks")
            block_bytes = model.block_bytes
            canonical = model.codec
        original = np.array(src.array)  # [layer][K|V][slot][token][head][dim], in slot order
        src.close()
        stop_ms = d.stop()
    except BaseException:
        d.kill()
        raise

    # The baseline's file: the same fp16 bytes, in the same directory as the segments.
    base_path = d.disk_dir.parent / "fp16.bin"
    with open(base_path, "wb") as f:
        f.write(original.tobytes())
        f.flush()
        os.fsync(f.fileno())
    base_buf = np.zeros(logical, dtype=np.uint8)  # touched: no page faults while timed

    dst = vqkv.KVCache.create(layout, n, name="disk.py-dst")
    reps: list[dict[str, Any]] = []
    first: np.ndarray | None = None
    same_every_rep = True
    try:
        for r in range(args.reps):
            start = d.start()
            if start["blocks"] != n:
                raise SystemExit(
                    f"disk.py: the restarted daemon holds {start['blocks']} of {n} blocks on disk")
            with vqkv.Client(str(sock), name="disk.py", timeout_ms=120000) as c:
                model = c.register_model(model_id, layout, codec)
                region = c.register_cache(model, dst)
                dst.array[...] = 0
                segs = d.segments()
                drop_cache(segs)
                resident = resident_bytes(segs)
                reads0 = c.stats().disk_reads
                t0 = time.perf_counter()
                lease = c.lookup(model, keys)
                t1 = time.perf_counter()
                written = lease.get(region, slots=range(lease.found))
                t2 = time.perf_counter()
                lease.release()
                st = c.stats()
            d.stop()
            if lease.found != n or written != n:
                raise SystemExit(f"disk.py: restored {lease.found} found / {written} written of {n} blocks")
            if st.disk_reads - reads0 != n:
                raise SystemExit(f"disk.py: the lookup read {st.disk_reads - reads0} of {n} blocks from disk")
            if resident:
                raise SystemExit(f"disk.py: {resident} bytes of the segments stayed cached after the drop")
            got = np.array(dst.array)
            if first is None:
                first = got
            elif not np.array_equal(got.view(np.uint16), first.view(np.uint16)):
                same_every_rep = False

            # Baseline: the same bytes from a plain file.
            drop_cache([base_path])
            base_resident = resident_bytes([base_path])
            b0 = time.perf_counter()
            nread = read_file_into(base_path, base_buf)
            b1 = time.perf_counter()
            if nread != logical:
                raise SystemExit(f"disk.py: read {nread} of {logical} bytes of {base_path.name}")
            reps.append({
                "rebuild_ms": start["rebuild_ms"],
                "accept_ms": start["accept_ms"],
                "segments": start["segments"],
                "segment_bytes": start["segment_bytes"],
                "resident_after_drop": resident,
                "lookup_ms": (t1 - t0) * 1e3,
                "get_ms": (t2 - t1) * 1e3,
                "restore_ms": (t2 - t0) * 1e3,
                "restore_gbps": logical / (t2 - t0) / 1e9,
                "disk_reads": st.disk_reads - reads0,
                "file_resident_after_drop": base_resident,
                "file_read_ms": (b1 - b0) * 1e3,
                "file_read_gbps": logical / (b1 - b0) / 1e9,
            })
            log(f"  rep {r + 1}: restore {reps[-1]['restore_ms']:.0f} ms "
                f"(lookup {reps[-1]['lookup_ms']:.0f}, get {reps[-1]['get_ms']:.0f}), "
                f"file read {reps[-1]['file_read_ms']:.0f} ms")
    except BaseException:
        d.kill()
        raise
    finally:
        dst.close()

    assert first is not None
    if codec.startswith("fp16"):
        exact = bool(np.array_equal(first.view(np.uint16), original.view(np.uint16)))
        check = "bytes equal to the put" if exact and same_every_rep else "MISMATCH"
        ok = exact and same_every_rep
        err: dict[str, float] = {}
    else:
        diff = first.astype(np.float32) - original.astype(np.float32)
        err = {
            "max_abs_err": float(np.abs(diff).max()),
            "rel_rms_err": float(np.sqrt((diff**2).mean() / (original.astype(np.float32) ** 2).mean())),
        }
        ok = same_every_rep
        check = (f"same every rep, rel RMS err {err['rel_rms_err']:.3f}" if same_every_rep
                 else "DIFFERS between reps")

    def med(k: str) -> float:
        return float(statistics.median(x[k] for x in reps))

    segment_bytes = reps[0]["segment_bytes"]
    return {
        "codec": canonical,
        "codec_asked": codec,
        "blocks": n,
        "block_logical_bytes": layout.block_bytes,
        "block_stored_bytes": block_bytes,
        "logical_bytes": logical,
        "segment_bytes": segment_bytes,
        "segments": reps[0]["segments"],
        "pool_bytes": pool,
        "stop_ms": stop_ms,
        "rebuild_ms": med("rebuild_ms"),
        "accept_ms": med("accept_ms"),
        "lookup_ms": med("lookup_ms"),
        "get_ms": med("get_ms"),
        "restore_ms": med("restore_ms"),
        "restore_gbps": med("restore_gbps"),
        "restore_disk_gbps": segment_bytes / (med("restore_ms") / 1e3) / 1e9,
        "file_read_ms": med("file_read_ms"),
        "file_read_gbps": med("file_read_gbps"),
        "restore_vs_file": med("restore_gbps") / med("file_read_gbps"),
        "check": check,
        "ok": ok,
        **err,
        "reps": reps,
    }


# ---- part 2: restart time against blocks held ------------------------------------------


def bench_restart(args: argparse.Namespace, work: Path, sock: Path, m: int) -> dict[str, Any]:
    import vqkv

    layout = vqkv.Layout(num_layers=1, num_kv_heads=1, head_dim=16, block_tokens=1)
    chain = min(args.chain_blocks, m)
    d = Daemon(args.vqkvd, work, sock, args.restart_pool_bytes)
    rng = np.random.default_rng(2)
    log(f"restart: {m} blocks of {layout.block_bytes} B in chains of {chain}")
    d.start()
    try:
        t0 = time.perf_counter()
        with vqkv.Client(str(sock), name="disk.py", timeout_ms=120000) as c:
            model = c.register_model("bench/tiny@fp16", layout, "fp16")
            cache = vqkv.KVCache.create(layout, chain, name="disk.py-tiny")
            cache.array[...] = rng.standard_normal(cache.array.shape, dtype=np.float32).astype(np.float16)
            region = c.register_cache(model, cache)
            done = 0
            while done < m:
                k = min(chain, m - done)
                keys = model.block_keys(rng.integers(0, 1 << 31, size=k, dtype=np.uint32))
                res = c.put(model, region, keys, slots=range(k))
                if res.stored != k:
                    raise SystemExit(f"disk.py: put stored {res.stored} of {k} blocks "
                                     f"({set(res.statuses)}); a larger pool is needed")
                done += k
            cache.close()
            held = c.stats().blocks
        put_s = time.perf_counter() - t0
        if held != m:
            raise SystemExit(f"disk.py: the daemon holds {held} of {m} blocks after the puts")
        stop_ms = d.stop()
        cold: list[dict[str, Any]] = []
        warm: list[dict[str, Any]] = []
        for _ in range(args.reps):
            drop_cache(d.segments())
            cold.append(d.start())
            d.stop()
        for _ in range(args.reps):
            warm.append(d.start())
            d.stop()
    except BaseException:
        d.kill()
        raise
    for s in cold + warm:
        if s["blocks"] != m:
            raise SystemExit(f"disk.py: a restart found {s['blocks']} of {m} blocks on disk")

    def med(xs: list[dict[str, Any]], k: str) -> float:
        return float(statistics.median(x[k] for x in xs))

    out = {
        "blocks": m,
        "block_logical_bytes": layout.block_bytes,
        "chain_blocks": chain,
        "segments": cold[0]["segments"],
        "segment_bytes": cold[0]["segment_bytes"],
        "put_s": put_s,
        "stop_ms": stop_ms,
        "cold_rebuild_ms": med(cold, "rebuild_ms"),
        "cold_accept_ms": med(cold, "accept_ms"),
        "warm_rebuild_ms": med(warm, "rebuild_ms"),
        "warm_accept_ms": med(warm, "accept_ms"),
        "cold": cold,
        "warm": warm,
    }
    for k in ("cold_rebuild_ms", "cold_accept_ms", "warm_rebuild_ms", "warm_accept_ms"):
        out[k.replace("_ms", "_ms_per_mblock")] = out[k] / (m / 1e6)
    log(f"  stop {stop_ms:.0f} ms; cold restart: rebuild {out['cold_rebuild_ms']:.0f} ms, "
        f"accept {out['cold_accept_ms']:.0f} ms; warm: {out['warm_rebuild_ms']:.0f} / "
        f"{out['warm_accept_ms']:.0f} ms")
    return out


# ---- output ------------------------------------------------------------------------------


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KMG]?)", text.strip().upper())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (N, NK, NM or NG)")
    return int(m[1]) << {"": 0, "K": 10, "M": 20, "G": 30}[m[2]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vqkvd", default=str(ROOT / "build" / "daemon" / "vqkvd"), help="the daemon binary")
    ap.add_argument("--lib", default=None,
                    help="libvqkv.so (default: $VQKV_LIBRARY, else build/client/libvqkv.so of the checkout)")
    ap.add_argument("--dir", default="/var/tmp",
                    help="where the work directory goes: on the disk to measure (default /var/tmp)")
    ap.add_argument("--json", metavar="OUT", help="write the figures as JSON here")
    ap.add_argument("--blocks", type=int, default=256, help="part 1: blocks of the prefix (default 256)")
    ap.add_argument("--codecs", default="fp16,kivi4",
                    help="part 1: codecs, comma-separated (default fp16,kivi4)")
    ap.add_argument("--reps", type=int, default=5,
                    help="restarts per measurement; the median is reported (default 5)")
    ap.add_argument("--pool-bytes", type=parse_size, default=0,
                    help="part 1's pool (default: twice the prefix's fp16 bytes, at least 256M)")
    ap.add_argument("--restart-blocks", type=int, default=200000,
                    help="part 2: blocks held, M; M/4 is measured too (default 200000; 0 skips part 2)")
    ap.add_argument("--chain-blocks", type=int, default=4096, help="part 2: blocks per chain and per put")
    ap.add_argument("--restart-pool-bytes", type=parse_size, default=parse_size("256M"),
                    help="part 2's pool (default 256M)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()

    if args.lib:
        os.environ["VQKV_LIBRARY"] = str(Path(args.lib).resolve())
    elif "VQKV_LIBRARY" not in os.environ and (ROOT / "build" / "client" / "libvqkv.so").exists():
        os.environ["VQKV_LIBRARY"] = str(ROOT / "build" / "client" / "libvqkv.so")
    if not os.access(args.vqkvd, os.X_OK):
        ap.error(f"{args.vqkvd} is not an executable vqkvd: build first (cmake --build --preset default)")
    if args.blocks < 1 or args.reps < 1:
        ap.error("--blocks and --reps must be at least 1")

    base = Path(args.dir)
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="vqkv-disk.", dir=base))
    # The socket lives apart: sun_path holds 108 bytes, and --dir may be long.
    sockdir = Path(tempfile.mkdtemp(prefix="vqkv-disk."))
    sock = sockdir / "vqkv.sock"
    facts = machine_facts(work)
    log(f"work directory {work} ({facts.get('fs_type')} on {facts.get('mount_source', '?')}), "
        f"nproc {facts['nproc']}")
    result: dict[str, Any] = {"bench": "disk", "machine": facts, "settings": {
        k: getattr(args, k) for k in ("blocks", "codecs", "reps", "restart_blocks", "chain_blocks")}}
    try:
        restore = []
        for codec in [c for c in args.codecs.split(",") if c]:
            sub = work / f"restore-{re.sub(r'[^A-Za-z0-9_.-]', '_', codec)}"
            sub.mkdir()
            restore.append(bench_restore(args, sub, sock, codec))
        result["restore"] = restore
        restart = []
        if args.restart_blocks > 0:
            for m in sorted({max(1, args.restart_blocks // 4), args.restart_blocks}):
                sub = work / f"restart-{m}"
                sub.mkdir()
                restart.append(bench_restart(args, sub, sock, m))
        result["restart"] = restart
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    fs = f"{facts.get('fs_type')}"
    if facts.get("mount_fstype"):
        fs += f" ({facts['mount_fstype']} on {facts.get('mount_source')}"
        fs += f", {'rotational' if facts.get('rotational') == '1' else 'non-rotational'})" \
            if "rotational" in facts else ")"
    print(f"\nRestore from disk after a restart, page cache dropped, median of {args.reps}: "
          f"SmolLM2-135M shape, {args.blocks} blocks, {fs}, nproc {facts['nproc']}\n")
    rows = []
    for r in result["restore"]:
        rows.append([
            r["codec_asked"], f"{r['logical_bytes'] / 1e6:.1f}", f"{r['segment_bytes'] / 1e6:.1f}",
            f"{r['rebuild_ms']:.0f}", f"{r['lookup_ms']:.0f}", f"{r['get_ms']:.0f}",
            f"{r['restore_gbps']:.3f}", f"{r['file_read_gbps']:.3f}", f"{r['restore_vs_file']:.2f}x",
            r["check"],
        ])
    print(table(["codec", "fp16 MB", "on disk MB", "rebuild ms", "lookup ms", "get ms",
                 "restore GB/s", "fp16 file GB/s", "vs file", "check"], rows))
    if result["restart"]:
        block = result["restart"][0]["block_logical_bytes"]
        print(f"\nRestart time against blocks held on disk ({block}-byte blocks), median of {args.reps}; "
              "cold: segments' page cache dropped first\n")
        rows = []
        for r in result["restart"]:
            rows.append([
                f"{r['blocks']:,}", str(r["segments"]), f"{r['segment_bytes'] / 1e6:.1f}",
                f"{r['cold_rebuild_ms']:.0f}", f"{r['cold_rebuild_ms_per_mblock']:.0f}",
                f"{r['cold_accept_ms']:.0f}", f"{r['cold_accept_ms_per_mblock']:.0f}",
                f"{r['warm_rebuild_ms']:.0f}", f"{r['warm_accept_ms']:.0f}", f"{r['stop_ms']:.0f}",
            ])
        print(table(["blocks", "segments", "on disk MB", "rebuild ms", "ms/M blocks",
                     "accept ms", "ms/M blocks", "warm rebuild ms", "warm accept ms", "stop ms"], rows))
    ok = all(r["ok"] for r in result["restore"])
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"\n{args.json} written")
    if not ok:
        log("restored bytes did not check out")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
