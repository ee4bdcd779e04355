"""The started calls against a running vqkvd: put_start, get_start, complete, fileno, pending.

Every test gets a fresh daemon (conftest.py). What they check is what an
engine's event loop relies on: several puts and gets in flight at once, each
completion handed back with its Request and the result the synchronous call
would have given (a put's statuses too, a get's bytes the same as a
synchronous get writes), completions kept across synchronous calls, the
socket to select() on, an error completing as the exception the synchronous
call raises, and the in-flight limit.
"""

from __future__ import annotations

import asyncio
import re
import select
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import POOL_BYTES, VQKVD
from daemon_harness import HANG_GUARD_S, Daemon
from test_client import LAYOUT, MODEL, N_BLOCKS, TOKENS, fill, offload

import vqkv

# daemon/server.c: max_inflight when the config says nothing.
DEFAULT_MAX_INFLIGHT = 64
HEADER = Path(__file__).resolve().parents[2] / "vqkv.h"


def sequence(i: int) -> list[int]:
    """Tokens of two full blocks, a different prompt for each i."""
    return [(104729 * i + 7 * t + 1) % 50000 for t in range(2 * LAYOUT.block_tokens)]


def collect(client: vqkv.Client, n: int) -> list[vqkv.Completion]:
    """Exactly n completions, waiting for them (the deadline only guards against a hang)."""
    got: list[vqkv.Completion] = []
    deadline = time.monotonic() + HANG_GUARD_S
    while len(got) < n:
        left = deadline - time.monotonic()
        assert left > 0, f"{len(got)} of {n} completions came: {got}"
        got += client.complete(timeout=left, max=n - len(got))
    return got


def test_async_max_is_the_headers() -> None:
    m = re.search(r"#define\s+VQKV_ASYNC_MAX\s+(\d+)", HEADER.read_text())
    assert m is not None and vqkv.ASYNC_MAX == int(m.group(1))


def test_started_puts_complete_together(client: vqkv.Client) -> None:
    model = client.register_model(MODEL, LAYOUT)
    cache = vqkv.KVCache.create(LAYOUT, 8)
    fill(cache, seed=3)
    region = client.register_cache(model, cache)
    keys = [model.block_keys(sequence(i)) for i in range(3)]
    assert client.pending == 0
    requests = [client.put_start(model, region, k, [2 * i, 2 * i + 1]) for i, k in enumerate(keys)]
    assert [(r.kind, r.n, r.done) for r in requests] == [("put", 2, False)] * 3
    assert len({r.id for r in requests}) == 3
    assert client.pending == 3
    done = collect(client, 3)
    assert client.pending == 0 and client.complete() == []
    assert sorted((c.request.id for c in done)) == sorted(r.id for r in requests)
    by_request = {id(c.request): c for c in done}
    for r in requests:
        c = by_request[id(r)]  # the very Request put_start returned
        assert r.done and c.ok and c.error is None
        assert (c.result, c.check(), c.statuses) == (2, 2, [vqkv.PutStatus.STORED] * 2)
        assert c.put_result() == vqkv.PutResult(2, [vqkv.PutStatus.STORED] * 2)
    for k in keys:
        with client.lookup(model, k) as lease:
            assert lease.found == 2
    assert client.stats().blocks == 6
    # Started again, with parents this time: already held, nothing stored.
    zero = np.zeros((1, vqkv.KEY_BYTES), np.uint8)
    again = client.put_start(model, region, keys[0], [0, 1], parents=np.vstack([zero, keys[0][:1]]))
    (c,) = collect(client, 1)
    assert c.request is again
    assert c.put_result() == vqkv.PutResult(0, [vqkv.PutStatus.PRESENT] * 2)


def test_started_gets_write_what_a_synchronous_get_writes(client: vqkv.Client) -> None:
    # kivi4 is lossy, so the bytes compared are the decoder's, not the original ones.
    model, cache, region, keys = offload(client, codec="kivi4")
    other = vqkv.KVCache.create(LAYOUT, 8)
    other_region = client.register_cache(model, other)
    with client.lookup(model, keys) as lease:
        assert lease.get(other_region, range(N_BLOCKS)) == N_BLOCKS  # synchronous, slots 0..3
        first = lease.get_start(region, [4, 5, 6, 7])
        second = client.get_start(lease.id, other_region, [7, 6, 5, 4])
        third = client.get_start(lease, other_region, [])
        assert client.pending == 3
        done = {c.request.id: c for c in collect(client, 3)}
    assert [(done[r.id].result, done[r.id].statuses) for r in (first, second, third)] == [
        (4, None),
        (4, None),
        (0, None),
    ]
    with pytest.raises(TypeError):
        done[first.id].put_result()
    synchronous = other.array[:, :, :N_BLOCKS].view(np.uint16)
    assert np.array_equal(cache.array[:, :, 4:8].view(np.uint16), synchronous)
    assert np.array_equal(other.array[:, :, 7:3:-1].view(np.uint16), synchronous)
    assert not np.array_equal(cache.array[:, :, 4:8], cache.array[:, :, :4])  # decoded, not copied


def test_a_synchronous_call_keeps_the_completions(daemon: Daemon, client: vqkv.Client) -> None:
    model = client.register_model(MODEL, LAYOUT)
    cache = vqkv.KVCache.create(LAYOUT, 8)
    fill(cache, seed=4)
    region = client.register_cache(model, cache)
    keys = [model.block_keys(sequence(i)) for i in range(3)]
    requests = [client.put_start(model, region, k, [2 * i, 2 * i + 1]) for i, k in enumerate(keys)]
    # Let every reply reach the socket before the synchronous call goes out,
    # so that the synchronous call has to read past them to find its own.
    with vqkv.Client(str(daemon.socket)) as watcher:
        deadline = time.monotonic() + HANG_GUARD_S
        while watcher.stats().blocks != 6:
            assert time.monotonic() < deadline, "the started puts did not store their blocks"
            time.sleep(0.01)
    time.sleep(0.2)
    assert select.select([client], [], [], 0)[0] == [client]
    sync = client.put(model, region, model.block_keys(sequence(3)), [6, 7])
    assert sync == vqkv.PutResult(2, [vqkv.PutStatus.STORED] * 2)
    assert client.stats().blocks == 8
    # The synchronous calls read the started ones' replies: the socket has
    # nothing more, yet every completion is there, without waiting.
    assert select.select([client], [], [], 0)[0] == []
    assert client.pending == 3
    done = client.complete(timeout=0)
    assert sorted(c.request.id for c in done) == sorted(r.id for r in requests)
    assert all(c.put_result() == vqkv.PutResult(2, [vqkv.PutStatus.STORED] * 2) for c in done)
    assert client.pending == 0


def test_fileno_becomes_readable(client: vqkv.Client) -> None:
    model, _, region, keys = offload(client)
    fd = client.fileno()
    assert fd >= 0
    assert select.select([fd], [], [], 0)[0] == []
    assert client.complete(timeout=None) == []  # nothing in flight: returns at once
    with client.lookup(model, keys) as lease:
        requests = [lease.get_start(region, [4 + i]) for i in range(N_BLOCKS)]
        done: list[vqkv.Completion] = []
        deadline = time.monotonic() + HANG_GUARD_S
        while len(done) < len(requests):
            left = deadline - time.monotonic()
            assert left > 0, f"{len(done)} of {len(requests)} completions came"
            readable, _, _ = select.select([fd], [], [], left)
            if readable:
                done += client.complete(timeout=0)
    assert sorted(c.request.id for c in done) == [r.id for r in requests]
    assert all(c.result == 1 for c in done)
    assert select.select([fd], [], [], 0)[0] == [] and client.pending == 0


def test_replies_read_together_all_complete(client: vqkv.Client) -> None:
    """Replies that one read of the socket takes in together complete in one complete(0).

    vqkv_complete returns with its first completion; the others' replies,
    already read off the socket, would never make it readable again.
    """
    model, _, region, keys = offload(client)
    with client.lookup(model, keys) as lease:
        requests = [lease.get_start(region, [4 + i]) for i in range(N_BLOCKS)]
        assert select.select([client], [], [], HANG_GUARD_S)[0] == [client]
        time.sleep(0.2)  # the other replies come right behind the first
        done = client.complete(timeout=0)
        assert sorted(c.request.id for c in done) == [r.id for r in requests]
        assert client.pending == 0 and select.select([client], [], [], 0)[0] == []
        # At most max at a time: the rest wait for the next call.
        requests = [lease.get_start(region, [4 + i]) for i in range(3)]
        assert select.select([client], [], [], HANG_GUARD_S)[0] == [client]
        time.sleep(0.2)
        first = client.complete(timeout=0, max=1)
        assert len(first) == 1 and client.pending == 2
        rest = client.complete(timeout=0)
        assert sorted(c.request.id for c in first + rest) == [r.id for r in requests]


def test_an_event_loop_watches_the_client(client: vqkv.Client) -> None:
    model, cache, region, keys = offload(client)

    async def restore() -> list[vqkv.Completion]:
        loop = asyncio.get_running_loop()
        finished: asyncio.Future[list[vqkv.Completion]] = loop.create_future()
        done: list[vqkv.Completion] = []

        def ready() -> None:
            done.extend(client.complete(timeout=0))
            if client.pending == 0 and not finished.done():
                finished.set_result(done)

        fd = client.fileno()
        loop.add_reader(fd, ready)
        try:
            with client.lookup(model, keys) as lease:
                lease.get_start(region, [4, 5, 6, 7])
                return await asyncio.wait_for(finished, HANG_GUARD_S)
        finally:
            loop.remove_reader(fd)

    (c,) = asyncio.run(restore())
    assert c.check() == N_BLOCKS
    assert np.array_equal(cache.array[:, :, 4:8], cache.array[:, :, :4])  # fp16: every byte


def test_errors_complete_as_the_synchronous_call_raises_them(client: vqkv.Client) -> None:
    model, cache, region, keys = offload(client)
    before = cache.array.copy()
    with client.lookup(model, keys) as lease:
        with pytest.raises(vqkv.VqkvError) as sync:
            lease.get(region, [5, 2**31])
        bad = lease.get_start(region, [5, 2**31])
        (c,) = collect(client, 1)
        assert c.request is bad and not c.ok and c.statuses is None
        assert type(c.result) is type(sync.value) is vqkv.OutOfRangeError
        assert c.error is c.result and c.result.code == vqkv.ErrorCode.ERANGE
        assert c.result.name == "VQKV_ERANGE" and str(bad.id) in c.result.message
        with pytest.raises(vqkv.OutOfRangeError):
            c.check()
        assert np.array_equal(cache.array, before)  # nothing written
        lease.get_start(region, [4, 5, 6, 7])  # the lease outlives the failed get
        assert collect(client, 1)[0].result == N_BLOCKS
        lease_id = lease.id
    client.get_start(lease_id, region, [0])  # released
    assert isinstance(collect(client, 1)[0].result, vqkv.LeaseError)

    with pytest.raises(vqkv.OutOfRangeError):
        client.put(model, region, model.block_keys(range(16)), [8])  # the cache has 8 slots
    client.put_start(model, region, model.block_keys(range(16)), [8])
    (p,) = collect(client, 1)
    assert isinstance(p.result, vqkv.OutOfRangeError) and p.statuses is None
    with pytest.raises(vqkv.OutOfRangeError):
        p.put_result()
    assert client.stats().blocks == N_BLOCKS  # nothing stored

    # Refused before anything is sent: raised, and no completion will come.
    with pytest.raises(vqkv.HandleError):
        client.put_start(model, vqkv.Region(999), keys[:1], [0])
    with pytest.raises(vqkv.HandleError):
        client.get_start(0, vqkv.Region(999), [0])
    with pytest.raises(vqkv.InvalidArgumentError):
        client.put_start(model, region, keys, [0])  # four keys, one slot
    with pytest.raises(vqkv.InvalidArgumentError):
        client.complete(max=0)
    with pytest.raises(vqkv.InvalidArgumentError):
        client.complete(timeout=-1)
    assert client.pending == 0 and client.complete(timeout=0.01) == []


@pytest.fixture(params=[4, None], ids=["max_inflight=4", "default"])
def limited(request: pytest.FixtureRequest) -> Iterator[tuple[vqkv.Client, int]]:
    """A client of a daemon with the given max_inflight (None: its default), and that number."""
    max_inflight: int | None = request.param
    directory = tempfile.mkdtemp(prefix="vqkv-py.")
    config = "" if max_inflight is None else f"[vqkvd]\nmax_inflight = {max_inflight}\n"
    d = Daemon(VQKVD, directory, config_text=config, pool_bytes=POOL_BYTES)
    try:
        with vqkv.Client(str(d.socket), name="pytest", timeout_ms=30000) as c:
            yield c, max_inflight or DEFAULT_MAX_INFLIGHT
    finally:
        d.stop()
        shutil.rmtree(directory)


def test_the_in_flight_limit(limited: tuple[vqkv.Client, int]) -> None:
    client, max_inflight = limited
    model, _, region, keys = offload(client)
    with client.lookup(model, keys) as lease:
        # Puts and gets alike, up to one less than the daemon's max_inflight:
        # the last one stays for synchronous calls.
        for i in range(max_inflight - 1):
            if i % 2:
                client.put_start(model, region, keys, range(N_BLOCKS))
            else:
                lease.get_start(region, [4 + i % 4])
        assert client.pending == max_inflight - 1
        with pytest.raises(vqkv.LimitError) as e:
            lease.get_start(region, [4])
        assert e.value.code == vqkv.ErrorCode.ELIMIT and e.value.name == "VQKV_ELIMIT"
        with pytest.raises(vqkv.LimitError):
            client.put_start(model, region, keys, range(N_BLOCKS))
        assert client.pending == max_inflight - 1
        assert client.stats().leases == 1  # the one left for synchronous calls
        done = collect(client, max_inflight - 1)
        assert all(c.ok for c in done)
        assert all(c.statuses in (None, [vqkv.PutStatus.PRESENT] * N_BLOCKS) for c in done)
        lease.get_start(region, [4])  # room again
        assert collect(client, 1)[0].result == 1


def test_closing_drops_the_started_calls(daemon: Daemon) -> None:
    client = vqkv.Client(str(daemon.socket))
    model, _, region, keys = offload(client)
    request = client.put_start(model, region, keys, range(N_BLOCKS))
    client.close()
    assert not request.done
    with pytest.raises(vqkv.ConnectionLostError, match="closed"):
        client.complete()
    with pytest.raises(vqkv.ConnectionLostError, match="closed"):
        client.fileno()
    with pytest.raises(vqkv.ConnectionLostError, match="closed"):
        assert client.pending
    with pytest.raises(vqkv.ConnectionLostError):
        client.put_start(model, region, keys, range(N_BLOCKS))
