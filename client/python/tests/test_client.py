"""The vqkv package against a running vqkvd: the whole worker API, CPU backend.

Every test gets a fresh daemon (conftest.py). What they check is what an
engine relies on: the session's facts, models and their codecs, KV caches
in memfds laid out as the C views say, block keys that agree with the C
implementation (vqkvctl, another process, pins the blocks by keys it hashes
itself), blocks put by one worker restored by another process into its own
memory (byte for byte for fp16, within the codec's error for kivi4), leases,
pins, eviction, the counters, and every refusal as an exception with its code.
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
from _worker import restore
from conftest import POOL_BYTES, VQKVD
from daemon_harness import HANG_GUARD_S, Daemon

import vqkv

LAYOUT = vqkv.Layout(num_layers=2, num_kv_heads=2, head_dim=64, block_tokens=16)
MODEL = "test/model@rev"
# Four full blocks and a partial tail, with the largest token id there is.
TOKENS = [(7919 * i) % 50000 for i in range(4 * 16 + 5)]
TOKENS[3] = 0xFFFFFFFF
N_BLOCKS = len(TOKENS) // LAYOUT.block_tokens


def fill(cache: vqkv.KVCache, seed: int, scale: float = 1.0) -> None:
    """Random values in [-scale, scale) in every slot of the cache."""
    rng = np.random.default_rng(seed)
    cache.array[...] = rng.uniform(-scale, scale, cache.array.shape).astype(cache.array.dtype)


def offload(
    client: vqkv.Client, codec: str = "fp16", num_blocks: int = 8, tokens: list[int] = TOKENS
) -> tuple[vqkv.Model, vqkv.KVCache, vqkv.Region, vqkv.Keys]:
    """A worker's setup, and tokens' full blocks put from slots 0, 1, ..."""
    model = client.register_model(MODEL, LAYOUT, codec)
    cache = vqkv.KVCache.create(LAYOUT, num_blocks)
    fill(cache, seed=1, scale=2.0)
    region = client.register_cache(model, cache)
    keys = model.block_keys(tokens)
    result = client.put(model, region, keys, range(len(keys)))
    assert result == vqkv.PutResult(len(keys), [vqkv.PutStatus.STORED] * len(keys))
    return model, cache, region, keys


# ---- session, models, memory ---------------------------------------------------------


def test_connect_says_who_and_what(daemon: Daemon) -> None:
    with vqkv.Client(str(daemon.socket), name="hello") as c:
        assert c.tenant == str(os.getuid())
        assert c.backend == "cpu"
        assert c.server_version
        assert not c.closed
    assert c.closed


def test_connect_to_nothing_raises_eio(tmp_path: Any) -> None:
    with pytest.raises(vqkv.VqkvError) as e:
        vqkv.Client(str(tmp_path / "absent.sock"))
    assert e.value.code == vqkv.ErrorCode.EIO and e.value.code == -6
    assert "No such file or directory" in e.value.message


def test_models_and_their_codecs(client: vqkv.Client) -> None:
    fp16 = client.register_model(MODEL, LAYOUT, "fp16")
    assert (fp16.codec, fp16.block_bytes, fp16.codebooks_ready) == ("fp16", LAYOUT.block_bytes, True)
    assert fp16.layout == LAYOUT
    kivi = client.register_model("test/kivi", LAYOUT, "kivi4")
    assert kivi.codec == "kivi4:g=32"
    assert 0 < kivi.block_bytes < LAYOUT.block_bytes // 2
    found = client.find_model("test/kivi")
    assert (found.codec, found.block_bytes, found.layout) == (kivi.codec, kivi.block_bytes, LAYOUT)

    with pytest.raises(vqkv.CodecSpecError, match="nonsense") as e:
        client.register_model("test/bad", LAYOUT, "nonsense:q=1")
    assert e.value.code == vqkv.ErrorCode.ESPEC
    other = vqkv.Layout(LAYOUT.num_layers, LAYOUT.num_kv_heads, 128, LAYOUT.block_tokens)
    with pytest.raises(vqkv.MismatchError):
        client.register_model(MODEL, other, "fp16")
    with pytest.raises(vqkv.HandleError):
        client.find_model("test/never-registered")


def test_model_rope(client: vqkv.Client) -> None:
    """A model's RoPE: the first named stays, another is a mismatch, a bad one never leaves."""
    m = client.register_model("test/rope", LAYOUT, "rvq:d=8,b=4,r=1", rope_theta=10000.0)
    assert m.codebooks_ready is False
    client.register_model("test/rope", LAYOUT, "rvq:d=8,b=4,r=1", rope_theta=10000.0)
    client.register_model("test/rope", LAYOUT, "rvq:d=8,b=4,r=1")
    with pytest.raises(vqkv.MismatchError, match="RoPE base 10000"):
        client.register_model("test/rope", LAYOUT, "rvq:d=8,b=4,r=1", rope_theta=500000.0)
    with pytest.raises(vqkv.InvalidArgumentError, match="RoPE"):
        client.register_model("test/rope2", LAYOUT, "rvq:d=8,b=4,r=1", rope_theta=1.0)
    with pytest.raises(ValueError, match="rope_style"):
        client.register_model("test/rope2", LAYOUT, "rvq:d=8,b=4,r=1", rope_theta=1e4, rope_style="gptj")


@pytest.mark.parametrize("kind", ["vllm", "split"])
def test_cache_array_follows_the_c_view(kind: Literal["vllm", "split"]) -> None:
    with vqkv.KVCache.create(LAYOUT, 5, kind=kind, gap=256) as cache:
        a, v = cache.array, cache.view
        assert a.shape == (2, 2, 5, 16, 2, 64) and a.dtype == np.float16
        assert cache.size == v.region_bytes
        base = a.ctypes.data - v.offset
        for index in [(0, 0, 0, 0, 0, 0), (1, 1, 4, 15, 1, 63), (1, 0, 2, 3, 1, 5), (0, 1, 3, 7, 0, 9)]:
            layer, kv, slot, token, head, dim = index
            want = (
                v.offset
                + layer * v.layer_stride
                + kv * v.kv_stride
                + slot * v.slot_stride
                + token * v.token_stride
                + head * v.head_stride
                + dim * 2
            )
            assert a[layer, kv, slot, token, head, dim:].ctypes.data - base == want
    if kind == "vllm":
        assert a.flags.c_contiguous and a.nbytes == v.region_bytes
    else:
        k_bytes = 5 * 16 * 2 * 64 * 2
        assert (v.kv_stride, v.layer_stride) == (k_bytes + 256, 2 * (k_bytes + 256))


def test_existing_memfd_at_an_offset(client: vqkv.Client) -> None:
    """A worker's own memfd, its cache 4 KiB in, registered and restored into."""
    model, _, _, keys = offload(client)
    view = vqkv.KVView.vllm(LAYOUT, 6).with_offset(4096)
    fd = vqkv.memfd_create("own", view.region_bytes)
    try:
        cache = vqkv.KVCache.from_fd(fd, LAYOUT, view)
        assert cache.size == view.region_bytes == 4096 + vqkv.KVView.vllm(LAYOUT, 6).region_bytes
        region = client.register_memfd(model, fd, cache.size, view)
        assert region.view == view
        with client.lookup(model, keys[:2]) as lease:
            assert lease.get(region, [4, 5]) == 2
        cache.close()
        assert os.fstat(fd).st_size == cache.size  # still the caller's fd
        raw = np.frombuffer(os.pread(fd, 4096, 0), np.uint8)
        assert not raw.any()  # nothing written before the offset
        assert cache.array[:, :, 4].any() and not cache.array[:, :, :4].any()
    finally:
        os.close(fd)


def test_torch_tensor_shares_the_memory() -> None:
    torch = pytest.importorskip("torch")
    with vqkv.KVCache.create(LAYOUT, 3) as cache:
        t = cache.tensor()
        assert tuple(t.shape) == cache.array.shape and t.dtype == torch.float16
        t[1, 0, 2, 3, 1, 5] = 1.5
        assert cache.array[1, 0, 2, 3, 1, 5] == 1.5


class _HostTensorPosingAsCuda:
    """A tensor's interface over host memory: what libvqkv sees from a CUDA
    tensor on a machine without a driver, or memory CUDA does not own."""

    is_cuda = True

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def data_ptr(self) -> int:
        return int(self.array.ctypes.data)

    def numel(self) -> int:
        return int(self.array.size)

    def element_size(self) -> int:
        return int(self.array.itemsize)

    def is_contiguous(self) -> bool:
        return True


def test_cuda_tensor_without_a_gpu_is_a_device_error(client: vqkv.Client) -> None:
    model = client.register_model(MODEL, LAYOUT)
    with pytest.raises(vqkv.InvalidArgumentError, match="CUDA tensor"):
        client.register_cuda_tensor(model, np.zeros(8, np.float16))
    fake = _HostTensorPosingAsCuda(np.zeros(LAYOUT.block_values * 3, np.float16))
    with pytest.raises(vqkv.InvalidArgumentError, match="neither"):
        client.register_cuda_tensor(model, fake, layout="paged")
    with pytest.raises(vqkv.OutOfRangeError, match="view reaches past"):
        client.register_cuda_tensor(model, fake, vqkv.KVView.vllm(LAYOUT, 4))
    for layout in ("vllm", "split"):
        with pytest.raises(vqkv.DeviceError) as err:
            client.register_cuda_tensor(model, fake, layout=layout)
        assert err.value.name == "VQKV_EDEVICE"
        assert "CUDA driver is not available" in str(err.value) or "not device memory" in str(err.value)
    # Nothing was registered; host memory still goes the memfd way, and a
    # CUDA event with its put or get is refused: the cpu backend has none.
    with vqkv.KVCache.create(LAYOUT, 2) as cache:
        region = client.register_cache(model, cache)
        keys = model.block_keys(TOKENS)[:1]
        with pytest.raises(vqkv.InvalidArgumentError, match="64 bytes"):
            client.put(model, region, keys, [0], event=b"short")
        with pytest.raises(vqkv.DeviceError, match="no GPU events"):
            client.put(model, region, keys, [0], event=bytes(64))
        assert client.put(model, region, keys, [0]).stored == 1
        with client.lookup(model, keys) as lease:
            with pytest.raises(vqkv.DeviceError, match="no GPU events"):
                lease.get(region, [1], event=bytes(64))
            assert lease.get(region, [1]) == 1


# ---- block keys ------------------------------------------------------------------------


def test_block_keys_chain(client: vqkv.Client) -> None:
    model = client.register_model(MODEL, LAYOUT)
    keys = model.block_keys(TOKENS)
    assert keys.shape == (N_BLOCKS, vqkv.KEY_BYTES) and keys.dtype == np.uint8
    assert len({k.tobytes() for k in keys}) == N_BLOCKS
    # A prefix's keys are the longer sequence's first keys; the partial tail gets none.
    assert np.array_equal(model.block_keys(TOKENS[:40]), keys[:2])
    assert np.array_equal(model.block_keys(np.array(TOKENS, dtype=np.int64)), keys)
    # Continuing from a parent equals hashing from scratch.
    assert np.array_equal(model.block_keys(TOKENS[32:], parent=keys[1]), keys[2:])
    assert np.array_equal(model.block_keys(TOKENS[32:], parent=keys[1].tobytes()), keys[2:])
    # Everything that decides the values is in the key.
    assert not np.array_equal(model.block_keys(TOKENS, extra=b"lora:42")[0], keys[0])
    kivi = client.register_model("test/kivi", LAYOUT, "kivi4")
    assert not np.array_equal(kivi.block_keys(TOKENS)[0], keys[0])
    for bad in ([-1, 2], [2**32], [1.5]):
        with pytest.raises(vqkv.InvalidArgumentError):
            model.block_keys(bad)


def test_block_keys_agree_across_processes(daemon: Daemon, client: vqkv.Client, vqkvctl: str) -> None:
    """vqkvctl (C, its own connection) hashes the tokens and pins exactly the blocks Python put."""
    model, _, _, keys = offload(client)
    with vqkv.Client(str(daemon.socket)) as other:
        assert np.array_equal(other.register_model(MODEL, LAYOUT).block_keys(TOKENS), keys)
    out = subprocess.run(
        [
            vqkvctl,
            "--socket",
            str(daemon.socket),
            "pin",
            "--model",
            MODEL,
            "--ttl-ms",
            "60000",
            "--tokens",
            ",".join(map(str, TOKENS)),
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert json.loads(out) == {"model": MODEL, "blocks": N_BLOCKS, "pinned": N_BLOCKS}
    assert client.unpin(model, keys) == N_BLOCKS


# ---- put, lookup, get, release ------------------------------------------------------------


@pytest.mark.parametrize("codec", ["fp16", "kivi4"])
@pytest.mark.parametrize("kind", ["vllm", "split"])
def test_second_worker_restores_the_blocks(
    daemon: Daemon, client: vqkv.Client, codec: str, kind: Literal["vllm", "split"]
) -> None:
    _, cache, _, _ = offload(client, codec)
    # An executor, not a Pool: a worker that dies fails the test
    # (BrokenProcessPool) where Pool.apply would wait for it forever.
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        got = pool.submit(
            restore, str(daemon.socket), MODEL, LAYOUT, codec, TOKENS, 7, kind
        ).result()
    assert (got.found, got.written, got.hits) == (N_BLOCKS, N_BLOCKS, N_BLOCKS)
    sent = np.stack([cache.array[:, :, s] for s in range(N_BLOCKS)])
    assert got.blocks.shape == sent.shape
    if codec == "fp16":
        assert np.array_equal(got.blocks.view(np.uint16), sent.view(np.uint16))  # every byte
    else:
        # 4 bits over a range of at most 4: half a step is 4/15/2 = 0.133.
        err = np.abs(got.blocks.astype(np.float32) - sent.astype(np.float32)).max()
        assert 0 < err <= 0.15


def test_lookup_finds_the_longest_prefix_and_leases_it(client: vqkv.Client) -> None:
    model, cache, region, keys = offload(client, tokens=TOKENS[:48])  # 3 of the 4 blocks
    full = model.block_keys(TOKENS)
    with client.lookup(model, full) as lease:
        assert lease.found == 3 and lease.id != 0
        assert client.stats().leases == 1
        assert client.get(lease, region, [7, 6]) == 2  # fewer than found is fine
        assert lease.get(region, [5, 4, 3]) == 3  # a lease serves more than one get
    assert lease.id == 0 and client.stats().leases == 0
    for got, put in ((7, 0), (6, 1), (3, 2)):
        assert np.array_equal(cache.array[:, :, got], cache.array[:, :, put])
    with client.lookup(model, model.block_keys(TOKENS[16:])) as miss:  # not a chain from the start
        assert (miss.found, miss.id) == (0, 0)


def test_put_statuses_and_continuations(client: vqkv.Client) -> None:
    model, _, region, stored = offload(client, tokens=TOKENS[:32])  # blocks 0 and 1
    again = client.put(model, region, stored, [0, 1])
    assert again == vqkv.PutResult(0, [vqkv.PutStatus.PRESENT] * 2)
    keys = model.block_keys(TOKENS)
    parents = np.vstack([np.zeros((1, vqkv.KEY_BYTES), np.uint8), keys[:-1]])
    # Block 3 without block 2 is refused; then blocks 2 and 3 continue the stored prefix.
    assert client.put(model, region, keys[3:], [3], parents=parents[3:]) == vqkv.PutResult(
        0, [vqkv.PutStatus.NO_PARENT]
    )
    assert client.put(model, region, keys[2:], [2, 3], parents=parents[2:]).stored == 2
    with client.lookup(model, keys) as lease:
        assert lease.found == N_BLOCKS


# ---- pin, unpin, evict, stats --------------------------------------------------------------------


def test_pins_keep_blocks_from_eviction(client: vqkv.Client) -> None:
    model, _, _, keys = offload(client)
    assert client.pin(model, keys[:2]) == 2
    assert client.evict(model, all=True) == N_BLOCKS - 2  # the pinned prefix stays
    with client.lookup(model, keys) as lease:
        assert lease.found == 2
    assert client.evict(model, keys[:1]) == 0  # its subtree holds a pinned block
    assert client.unpin(model, keys[:2]) == 2
    assert client.unpin(model, keys[:2]) == 0
    assert client.evict(model, keys[:1]) == 2  # the block and its descendant
    assert client.stats().blocks == 0


def test_evict_takes_descendants_and_spares_leases(client: vqkv.Client) -> None:
    model, _, _, keys = offload(client)
    with client.lookup(model, keys[:1]):
        assert client.evict(model, keys[:1]) == 0  # leased
    assert client.evict(model, keys[2:3]) == 2
    with client.lookup(model, keys) as lease:
        assert lease.found == 2
    with pytest.raises(vqkv.InvalidArgumentError):
        client.evict(model)
    with pytest.raises(vqkv.InvalidArgumentError):
        client.evict(model, keys, all=True)


def test_stats_count_the_traffic(daemon: Daemon, client: vqkv.Client, vqkvctl: str) -> None:
    model, _, _, keys = offload(client, codec="kivi4")
    with client.lookup(model, keys[:3]):
        pass
    extra = model.block_keys(TOKENS + list(range(32)))
    client.lookup(model, extra).release()  # N_BLOCKS hits, 2 misses
    assert client.evict(model, keys[3:]) == 1
    s = client.stats()
    stored = (N_BLOCKS - 1) * model.block_bytes
    logical = (N_BLOCKS - 1) * LAYOUT.block_bytes
    assert (s.blocks, s.bytes_stored, s.bytes_logical) == (N_BLOCKS - 1, stored, logical)
    assert (s.hits, s.misses, s.evictions) == (3 + N_BLOCKS, 2, 1)
    assert (s.clients, s.leases, s.pool_bytes) == (1, 0, POOL_BYTES)
    # The fields past the ones above: a ctypes struct out of step with
    # vqkv_stats_t shows here first (offload registered one region).
    assert (s.regions, s.pool_slots_used, s.pool_bytes_used) == (1, N_BLOCKS - 1, stored)
    assert s.n_tenants_total == len(s.tenants) == 1
    assert s.tenants[0] == vqkv.TenantStats(
        str(os.getuid()), 3 + N_BLOCKS, 2, N_BLOCKS - 1, stored, logical, 1, 0
    )
    # The same numbers through the C tool's JSON, with one more client: vqkvctl's.
    out = subprocess.run(
        [vqkvctl, "--socket", str(daemon.socket), "stats", "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    c = json.loads(out)
    assert {
        k: c[k]
        for k in (
            "blocks",
            "bytes_stored",
            "bytes_logical",
            "hits",
            "misses",
            "evictions",
            "leases",
            "pool_bytes",
        )
    } == {
        "blocks": s.blocks,
        "bytes_stored": s.bytes_stored,
        "bytes_logical": s.bytes_logical,
        "hits": s.hits,
        "misses": s.misses,
        "evictions": s.evictions,
        "leases": s.leases,
        "pool_bytes": s.pool_bytes,
    }
    assert c["clients"] == 2
    assert c["tenants"][0]["quota_bytes"] == 0 and c["tenants"][0]["tenant"] == s.tenants[0].tenant


# ---- errors and lifetimes -----------------------------------------------------------------------


def test_refusals_are_exceptions_with_codes(client: vqkv.Client) -> None:
    model, cache, region, keys = offload(client)
    with pytest.raises(vqkv.HandleError) as e:
        client.put(model, vqkv.Region(999), keys[:1], [0])
    assert (e.value.code, e.value.name) == (vqkv.ErrorCode.EHANDLE, "VQKV_EHANDLE")
    assert e.value.description == "unknown model or region handle"
    assert e.value.message and isinstance(e.value, vqkv.VqkvError)

    with pytest.raises(vqkv.OutOfRangeError, match="slot 8") as r:
        client.put(model, region, model.block_keys(range(16)), [8])  # the cache has 8 slots
    assert r.value.code == vqkv.ErrorCode.ERANGE and r.value.code == -3
    assert isinstance(r.value, IndexError)
    assert client.stats().blocks == N_BLOCKS  # nothing stored

    before = cache.array.copy()
    with client.lookup(model, keys) as lease:
        with pytest.raises(vqkv.OutOfRangeError):
            lease.get(region, [5, 2**31])
        assert np.array_equal(cache.array, before)  # nothing written
        assert lease.get(region, [4, 5, 6, 7]) == 4  # the lease outlives the failed get
        lease_id = lease.id
    with pytest.raises(vqkv.LeaseError) as le:
        client.release(lease_id)
    assert le.value.code == vqkv.ErrorCode.ELEASE
    with pytest.raises(vqkv.LeaseError):
        client.get(lease_id, region, [0])

    with pytest.raises(vqkv.InvalidArgumentError):
        client.put(model, region, keys, [0])  # four keys, one slot
    with pytest.raises(vqkv.InvalidArgumentError):
        client.lookup(model, [b"short"])


@pytest.mark.parametrize("why", ["missing", "refused"])
def test_no_daemon_on_the_socket_is_a_connection_error(tmp_path: Path, why: str) -> None:
    path = tmp_path / "vqkv.sock"
    with socket.socket(socket.AF_UNIX) as bound:
        if why == "refused":
            bound.bind(str(path))  # a socket file nobody listens on
        with pytest.raises(ConnectionError) as e:
            vqkv.Client(str(path))
    assert isinstance(e.value, vqkv.DaemonUnreachableError) and isinstance(e.value, vqkv.VqkvError)
    assert (e.value.code, e.value.name) == (vqkv.ErrorCode.EIO, "VQKV_EIO")
    reason = "No such file or directory" if why == "missing" else "Connection refused"
    assert e.value.message == f"connect to {path}: {reason}"


def test_a_daemon_that_goes_away_raises_connection_errors(daemon: Daemon) -> None:
    with vqkv.Client(str(daemon.socket)) as client:
        model, _, region, keys = offload(client)
        lease = client.lookup(model, keys)
        daemon.stop()
        # A get is never retried (its lease went with the connection).
        with pytest.raises(ConnectionError) as lost:
            lease.get(region, [4, 5])
        assert isinstance(lost.value, vqkv.ConnectionLostError)
        assert (lost.value.code, lost.value.name) == (vqkv.ErrorCode.ECLOSED, "VQKV_ECLOSED")
        # The next call reconnects, and finds nobody.
        with pytest.raises(ConnectionError) as gone:
            client.stats()
        assert isinstance(gone.value, vqkv.DaemonUnreachableError)
        assert gone.value.name == "VQKV_EIO" and gone.value.message.startswith("reconnecting")


def test_a_restarted_daemon_costs_idempotent_calls_nothing(daemon: Daemon) -> None:
    with vqkv.Client(str(daemon.socket)) as client:
        model, _, region, keys = offload(client)
        daemon.stop()
        again = Daemon(VQKVD, daemon.socket.parent, pool_bytes=POOL_BYTES)
        try:
            # The connection is dead, but libvqkv sends the put once more on a new one.
            assert client.put(model, region, keys, range(len(keys))).stored == len(keys)
            assert client.stats().blocks == len(keys)
        finally:
            again.stop()


def test_closing_ends_everything_the_client_held(daemon: Daemon) -> None:
    with vqkv.Client(str(daemon.socket)) as watcher:
        with vqkv.Client(str(daemon.socket)) as worker:
            model, _, _, keys = offload(worker)
            lease = worker.lookup(model, keys)
            assert worker.pin(model, keys) == N_BLOCKS
            assert watcher.stats().leases == 1 and watcher.stats().clients == 2
        assert worker.closed
        lease.release()  # the daemon dropped it with the connection: nothing to do
        # The daemon sees the hang-up in its own time: wait for it.
        deadline = time.monotonic() + HANG_GUARD_S
        while (s := watcher.stats()).clients != 1:
            assert time.monotonic() < deadline, f"the daemon still counts {s.clients} clients"
            time.sleep(0.01)
        assert (s.leases, s.blocks) == (0, N_BLOCKS)  # the blocks stay
        # The pins went too: everything can be evicted.
        assert watcher.evict(watcher.find_model(MODEL), all=True) == N_BLOCKS
        with pytest.raises(vqkv.ConnectionLostError, match="closed"):
            worker.stats()
        with pytest.raises(vqkv.ConnectionLostError):
            model.block_keys(TOKENS)
        worker.close()  # twice is fine


def test_threads_may_share_a_client(client: vqkv.Client) -> None:
    model, _, region, keys = offload(client)
    failures: list[BaseException] = []

    def work(slot: int) -> None:
        try:
            for _ in range(20):
                with client.lookup(model, keys) as lease:
                    assert lease.found == N_BLOCKS
                    assert lease.get(region, [slot]) == 1
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            failures.append(e)

    threads = [threading.Thread(target=work, args=(4 + i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert client.stats().hits == 4 * 20 * N_BLOCKS


# ---- the disk tier through vqkvctl ------------------------------------------------------


def test_vqkvctl_flush(daemon: Daemon, client: vqkv.Client, vqkvctl: str) -> None:
    """flush needs a disk tier; with one it writes what memory holds, once."""

    def flush(socket_path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [vqkvctl, "--socket", str(socket_path), "flush"], capture_output=True, text=True
        )

    none = flush(daemon.socket)
    assert none.returncode == 1
    assert "no disk tier" in none.stderr
    disk = daemon.socket.parent / "tiered"
    disk.mkdir()
    tiered = Daemon(VQKVD, disk, "--disk-dir", str(disk / "disk"), pool_bytes=POOL_BYTES)
    try:
        with vqkv.Client(str(tiered.socket), name="pytest-disk", timeout_ms=30000) as c:
            _, _, _, keys = offload(c)
        first = flush(tiered.socket)
        assert first.returncode == 0, first.stderr
        assert first.stdout == f"flushed: {len(keys)} blocks written to the disk tier\n"
        assert list((disk / "disk").glob("seg-*.vqs"))
        assert flush(tiered.socket).stdout == "flushed: 0 blocks written to the disk tier\n"
    finally:
        tiered.stop()
