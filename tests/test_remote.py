#!/usr/bin/env python3
"""vqkvd's remote tier (daemon/remote.h) between two nodes through a real Redis.

Two vqkvd daemons, each with its own socket, pool and state directory (two
"nodes"), share one redis-server (a Unix socket, a password read from a file)
and one salt secret file: node A puts, node B restores every byte of it
through Redis; B adopts the codebooks A trained and decodes A's rvq blocks to
exactly A's bytes; Redis killed and restarted under traffic (both nodes keep
serving from memory, count what they skipped and reconnect); values planted in
Redis that are damaged or hostile (a short value, a flipped payload byte, a
header for another key, another codec, a record whose header checksum was
recomputed to look whole) are refused and counted, never decoded. The
restore, the adoption and the refusals run twice: on one redis-server and on
a three-node Redis Cluster started here (values land on every node); and the
two nodes on such a cluster resharded while node A writes and node B reads.

ctest runs this file as a script: it re-runs itself with the project's .venv
(tools/bootstrap.sh) and skips, loudly, with exit status 77 without one or
without redis-server. VQKVD_PATH and VQKV_LIBRARY name the built binaries.
"""
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VQKVD = os.environ.get("VQKVD_PATH", "")
NO_BINARIES = "SKIPPED: VQKVD_PATH and VQKV_LIBRARY must name the built files (ctest sets them)"

if __name__ == "__main__":
    if not (os.access(VQKVD, os.X_OK) and os.path.isfile(os.environ.get("VQKV_LIBRARY", ""))):
        print(NO_BINARIES)
        sys.exit(77)
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        print("SKIPPED: test_remote needs redis-server and redis-cli (run tools/bootstrap.sh)")
        sys.exit(77)
    import daemon_harness

    daemon_harness.run_script(__file__, ["numpy", "redis"])

sys.path.insert(0, str(ROOT / "client" / "python" / "src"))

import daemon_harness  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import redis  # noqa: E402
from daemon_harness import HANG_GUARD_S  # noqa: E402

import vqkv  # noqa: E402

if not os.access(VQKVD, os.X_OK):
    pytest.skip(NO_BINARIES, allow_module_level=True)

LAYOUT = vqkv.Layout(num_layers=2, num_kv_heads=2, head_dim=64, block_tokens=16)
MODEL = "test/remote@rev"
BLOCKS = 6
RECORD_BYTES = 208  # daemon/segment.h's record header before each value's payload
PASSWORD = "s3cret-for-the-test"
# A lookup's wait for Redis: long enough that a loaded machine (ASan, 2
# cores) never answers late where a test wants every block.
LOOKUP_MS = 3000

# ---- servers ---------------------------------------------------------------------------


def cluster_port() -> int:
    """A free port whose cluster bus port (10000 above it, so at most 55535) is free too."""
    while True:
        with socket.socket() as s, socket.socket() as bus:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            if port > 55535:
                continue
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
            return port


def redis_env() -> dict[str, str]:
    """redis-server's and redis-cli's environment: without the ASan runtime Python may preload."""
    return {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "ASAN_OPTIONS")}


def wait_for(what: str, cond, guard: float = HANG_GUARD_S) -> None:
    """Waits for cond(), failing after guard seconds: a hang guard, never a timing check."""
    deadline = time.monotonic() + guard
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class RedisServer:
    """redis-server on a Unix socket in directory, with a password; stop() kills it."""

    def __init__(self, directory: Path, *args: str) -> None:
        self.dir = directory
        self.dir.mkdir(exist_ok=True)
        self.sock = directory / "redis.sock"
        self.args = args
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", "0", "--unixsocket", str(self.sock), "--unixsocketperm",
             "700", "--requirepass", PASSWORD, "--save", "", "--appendonly", "no", "--dir",
             str(self.dir), *self.args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=redis_env(),
            preexec_fn=daemon_harness._die_with_parent)
        wait_for("redis-server", self.answers)

    @property
    def url(self) -> str:
        return f"unix://{self.sock}"

    def client(self) -> redis.Redis:
        return redis.Redis(unix_socket_path=str(self.sock), password=PASSWORD)

    def answers(self) -> bool:
        try:
            return self.client().ping()
        except redis.exceptions.ConnectionError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Node(daemon_harness.Daemon):
    """A vqkvd of its own with the remote tier and a metrics endpoint to read its counters."""

    def __init__(self, directory: Path, remote: str, secret: Path, *extra: str) -> None:
        directory.mkdir(exist_ok=True)
        password = directory / "redis-password"
        password.write_text(PASSWORD + "\n")
        password.chmod(0o600)
        config = (f"[vqkvd]\nremote = {remote}\nremote_password_file = {password}\n"
                  f"salt_secret_file = {secret}\nmetrics_address = 127.0.0.1:0\n"
                  f"calibration_tokens = 64\nremote_lookup_ms = {LOOKUP_MS}\n" +
                  "".join(line + "\n" for line in extra))
        super().__init__(VQKVD, directory, config_text=config, ready=self.found_metrics_url)

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(self.url + "/metrics", timeout=HANG_GUARD_S) as r:
            text = r.read().decode()
        return {m.group(1): float(m.group(2))
                for m in re.finditer(r"^(vqkv_remote_\w+) (\S+)$", text, re.M)}

    def metric(self, name: str) -> float:
        return self.metrics()[f"vqkv_remote_{name}"]


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "salt-secret"
    path.write_bytes(os.urandom(32))
    path.chmod(0o600)
    return path


@pytest.fixture
def server(tmp_path: Path):
    r = RedisServer(tmp_path / "redis")
    yield r
    r.stop()


@pytest.fixture(params=["redis", "cluster"])
def store(request, tmp_path: Path):
    """What the nodes share: one redis-server, or a three-node Redis Cluster."""
    s = RedisServer(tmp_path / "redis") if request.param == "redis" else Cluster(tmp_path)
    yield s
    s.stop()


@contextlib.contextmanager
def two_nodes(directory: Path, url: str, secret: Path, secret_b: Path | None = None):
    """Nodes A and B on url, connected; stopped (exit status 0 wanted) at the end."""
    started = []
    try:
        for name, key in (("a", secret), ("b", secret_b or secret)):
            started.append(Node(directory / name, url, key))
        a, b = started
        wait_for("both nodes connected", lambda: a.metric("up") == 1 and b.metric("up") == 1)
        yield a, b
    finally:
        for n in started:
            n.stop()


@pytest.fixture
def nodes(tmp_path: Path, store, secret: Path):
    with two_nodes(tmp_path, store.url, secret) as ab:
        yield ab


@pytest.fixture
def standalone_nodes(tmp_path: Path, server: RedisServer, secret: Path):
    with two_nodes(tmp_path, server.url, secret) as ab:
        yield ab


@pytest.fixture
def cluster(tmp_path: Path):
    c = Cluster(tmp_path)
    yield c
    c.stop()


# ---- workers ---------------------------------------------------------------------------


def tokens(seed: int, blocks: int = BLOCKS) -> list[int]:
    return [(7919 * i + 104729 * seed) % 50000 for i in range(blocks * LAYOUT.block_tokens)]


class Worker:
    """A client of one node with a model and a KV cache in a memfd."""

    def __init__(self, node: daemon_harness.Daemon, codec: str = "fp16",
                 num_blocks: int = 32) -> None:
        self.client = vqkv.Client(str(node.socket), name="test_remote", timeout_ms=30000)
        self.codec = codec
        self.model = self.client.register_model(MODEL, LAYOUT, codec)
        self.cache = vqkv.KVCache.create(LAYOUT, num_blocks)
        self.region = self.client.register_cache(self.model, self.cache)

    def ready(self) -> bool:
        return self.client.register_model(MODEL, LAYOUT, self.codec).codebooks_ready

    def put(self, seed: int, blocks: int = BLOCKS) -> vqkv.Keys:
        rng = np.random.default_rng(seed)
        self.cache.array[:, :, :blocks] = rng.uniform(-2, 2, self.slots(0, blocks).shape)
        keys = self.model.block_keys(tokens(seed, blocks))
        result = self.client.put(self.model, self.region, keys, range(blocks))
        assert result.stored + result.statuses.count(vqkv.PutStatus.PRESENT) == blocks, result
        return keys

    def restore(self, keys: vqkv.Keys) -> tuple[int, np.ndarray]:
        """Looks keys up and gets what was found into slots 16...; returns (found, those blocks)."""
        with self.client.lookup(self.model, keys) as lease:
            found = lease.found
            if found:
                lease.get(self.region, range(16, 16 + found))
        return found, self.slots(16, 16 + found).copy()

    def slots(self, first: int, end: int) -> np.ndarray:
        """Cache slots [first, end): the third axis of the vLLM layout's array."""
        return self.cache.array[:, :, first:end]

    def close(self) -> None:
        self.client.close()


def written(node: Node, blocks: int) -> None:
    wait_for(f"{blocks} blocks stored in Redis", lambda: node.metric("puts_stored_total") >= blocks)


# ---- two nodes, one Redis ----------------------------------------------------------------


def test_node_b_restores_what_node_a_put(nodes) -> None:
    a, b = nodes
    wa, wb = Worker(a), Worker(b)
    keys = wa.put(seed=1)
    put = wa.slots(0, BLOCKS).copy()
    written(a, BLOCKS)
    found, got = wb.restore(keys)
    assert found == BLOCKS
    assert np.array_equal(got, put)  # fp16: every byte
    m = b.metrics()
    assert m["vqkv_remote_fetch_hits_total"] == BLOCKS
    assert m["vqkv_remote_rejected_total"] == 0
    # Now in B's memory: the next lookup asks Redis for nothing.
    fetches = m["vqkv_remote_fetches_total"]
    assert wb.restore(keys)[0] == BLOCKS
    assert b.metric("fetches_total") == fetches
    # A chain that goes on past what anyone put: the found prefix, the rest missed.
    longer = wa.model.block_keys(tokens(1, BLOCKS + 2))
    wc = Worker(b)
    assert wc.restore(longer)[0] == BLOCKS
    for w in (wa, wb, wc):
        w.close()


def test_nodes_without_a_shared_secret_share_nothing(tmp_path: Path, server: RedisServer,
                                                     secret: Path) -> None:
    other = tmp_path / "other-secret"
    other.write_bytes(os.urandom(32))
    other.chmod(0o600)
    with two_nodes(tmp_path, server.url, secret, other) as (a, b):
        wa, wb = Worker(a), Worker(b)
        keys = wa.put(seed=2)
        written(a, BLOCKS)
        # B's tenant salt differs, so B's keys for the same tokens do too.
        assert wb.restore(wb.model.block_keys(tokens(2)))[0] == 0
        assert b.metric("fetch_hits_total") == 0
        # A's raw keys are A's tenant's on B too (same uid), found under them.
        assert wb.restore(keys)[0] == BLOCKS
        wa.close()
        wb.close()


def test_codebooks_trained_on_a_are_adopted_by_b(nodes) -> None:
    a, b = nodes
    wa = Worker(a, "rvq")
    # 64 calibration tokens: four fp16 blocks, then A trains and publishes.
    wa.put(seed=3, blocks=4)
    wait_for("A's codebooks", wa.ready)
    wait_for("A's codebooks published", lambda: a.metric("codebooks_published_total") == 1)
    wb = Worker(b, "rvq")
    wait_for("B adopting A's codebooks", wb.ready)
    assert b.metric("codebooks_adopted_total") == 1
    assert "training codebooks" not in b.log.read_text()  # B never trained its own
    keys = wa.put(seed=4)
    written(a, 4 + BLOCKS)
    found, got = wb.restore(keys)
    assert found == BLOCKS
    # The same codes and codebooks: B decodes exactly what A decodes.
    found_a, got_a = wa.restore(keys)
    assert found_a == BLOCKS and np.array_equal(got, got_a)
    # rvq's reconstruction, not the fp16 bytes put (nor an fp16 fallback copy).
    assert not np.array_equal(got, wa.slots(0, BLOCKS))
    assert b.metric("rejected_total") == 0
    wa.close()
    wb.close()


def test_redis_down_and_back_under_traffic(standalone_nodes, server: RedisServer) -> None:
    a, b = standalone_nodes
    wa, wb = Worker(a), Worker(b)
    # A Redis that does not answer: the lookup answers with what is local
    # once remote_lookup_ms have passed, the blocks asked for counted late.
    keys = wa.put(seed=4)
    written(a, BLOCKS)
    server.proc.send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        assert wb.restore(keys)[0] == 0
        assert time.monotonic() - t0 >= LOOKUP_MS / 1000 * 0.9
        assert b.metric("fetch_late_total") == BLOCKS
    finally:
        server.proc.send_signal(signal.SIGCONT)
    # Traffic on both nodes all along, from workers of its own: A puts new
    # chains and restores them, B looks them up; none of it may fail.
    stop, errors, rounds = threading.Event(), [], [0]

    def traffic() -> None:
        ta, tb = Worker(a), Worker(b)
        try:
            seed = 100
            while not stop.is_set():
                keys = ta.put(seed=seed)
                found, got = ta.restore(keys)
                assert found == BLOCKS and np.array_equal(got, ta.slots(0, BLOCKS))
                found, got = tb.restore(keys)
                assert np.array_equal(got, ta.slots(0, found))
                seed += 1
                rounds[0] += 1
        except Exception as e:  # noqa: BLE001 -- reported by the test's thread
            errors.append(e)
        finally:
            ta.close()
            tb.close()

    thread = threading.Thread(target=traffic)
    thread.start()
    wait_for("traffic", lambda: rounds[0] >= 3 or errors)
    server.stop()
    wait_for("both nodes to see Redis gone", lambda: a.metric("up") == 0 and b.metric("up") == 0)
    # Both keep serving from memory; A's blocks are skipped, counted.
    keys = wa.put(seed=5)
    assert wa.restore(keys)[0] == BLOCKS
    assert a.metric("puts_skipped_total") >= BLOCKS
    assert wb.restore(keys)[0] == 0  # B cannot reach them, and says so at once
    server.start()
    wait_for("both nodes reconnected", lambda: a.metric("up") == 1 and b.metric("up") == 1)
    assert a.metric("reconnects_total") >= 1 and b.metric("reconnects_total") >= 1
    keys = wa.put(seed=6)
    wait_for("A's new chain in Redis", lambda: wb.restore(keys)[0] == BLOCKS)
    done = rounds[0]
    wait_for("more traffic", lambda: rounds[0] >= done + 3 or errors)
    stop.set()
    thread.join(HANG_GUARD_S)
    assert not errors, errors
    wa.close()
    wb.close()


# ---- what Redis hands back is never trusted ---------------------------------------------


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def reseal(header: bytearray) -> bytes:
    """The header with its own checksum (bytes 204..207) recomputed: it parses as whole."""
    header[204:208] = crc32c(bytes(header[:204])).to_bytes(4, "little")
    return bytes(header)


def block_key(r: redis.Redis, key: bytes) -> bytes:
    names = [k for k in r.scan_iter(match=b"vqkv:b:*") if k.endswith(key.hex().encode())]
    assert len(names) == 1
    return names[0]


def damages(value: bytes, other: bytes) -> dict[str, bytes]:
    """Ways to spoil block 3's value; other is block 4's, of the same chain."""
    header, payload = bytearray(value[:RECORD_BYTES]), value[RECORD_BYTES:]
    spec = bytearray(header)
    spec[136:200] = b"kivi4".ljust(64, b"\0")
    books = bytearray(header)
    books[104] ^= 1
    logical = bytearray(header)
    logical[28] ^= 1
    flipped = bytearray(payload)
    flipped[len(flipped) // 2] ^= 0x40
    return {
        "short": value[:-1],
        "long": value + b"\0",
        "header only": value[:RECORD_BYTES],
        "garbage": os.urandom(len(value)),
        "payload flipped": bytes(header) + bytes(flipped),
        "header flipped": bytes(header[:50]) + bytes([header[50] ^ 1]) + value[51:],
        "another block": other,
        "another codec": reseal(spec) + payload,
        "other codebooks": reseal(books) + payload,
        "another size": reseal(logical) + payload,
    }


def test_damaged_and_hostile_values_are_refused(nodes, store) -> None:
    a, b = nodes
    wa = Worker(a)
    keys = wa.put(seed=7)
    put = wa.slots(0, BLOCKS).copy()
    written(a, BLOCKS)
    r = store.client()
    name = block_key(r, bytes(keys[3]))
    good = r.get(name)
    other = r.get(block_key(r, bytes(keys[4])))
    ttl = r.ttl(name)
    assert 0 < ttl <= 86400  # remote_ttl_s's default
    rejected = 0
    for what, bad in damages(good, other).items():
        r.set(name, bad)
        wb = Worker(b)  # a fresh B-side view: evict what B holds first
        wb.client.evict(wb.model, all=True)
        found, got = wb.restore(keys)
        assert found == 3, what  # blocks 0..2, never the spoiled one or those after it
        assert np.array_equal(got, put[:, :, :3]), what
        rejected += 1
        assert b.metric("rejected_total") == rejected, what
        wb.close()
    r.set(name, good)
    wb = Worker(b)
    assert wb.restore(keys)[0] == BLOCKS
    wb.close()
    wa.close()


# ---- a Redis Cluster ------------------------------------------------------------------------


class Cluster:
    """Three redis-server --cluster-enabled nodes on loopback, made a cluster by redis-cli."""

    def __init__(self, directory: Path) -> None:
        self.ports = [cluster_port() for _ in range(3)]
        self.directory = directory
        self.procs = []
        for port in self.ports:
            (directory / f"cluster-{port}").mkdir()
            self.procs.append(self._start(port))
        for port in self.ports:
            wait_for(f"cluster node {port}", lambda p=port: self._answers(p))
        subprocess.run(["redis-cli", "-a", PASSWORD, "--no-auth-warning", "--cluster", "create",
                        *[f"127.0.0.1:{p}" for p in self.ports], "--cluster-replicas", "0",
                        "--cluster-yes"], check=True, stdout=subprocess.DEVNULL, timeout=60, env=redis_env(),
            preexec_fn=daemon_harness._die_with_parent)
        wait_for("cluster_state:ok", lambda: all(
            self.node(p).cluster("info")["cluster_state"] == "ok" for p in self.ports))

    def _start(self, port: int) -> subprocess.Popen:
        """A node; started again in its directory, it rejoins with the slots nodes.conf names."""
        return subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled",
             "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000",
             "--requirepass", PASSWORD, "--masterauth", PASSWORD, "--save", "",
             "--appendonly", "no", "--dir", str(self.directory / f"cluster-{port}")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=redis_env(),
            preexec_fn=daemon_harness._die_with_parent)

    def kill(self, i: int) -> None:
        self.procs[i].kill()
        self.procs[i].wait()

    def restart(self, i: int) -> None:
        self.procs[i] = self._start(self.ports[i])
        wait_for("the node back", lambda: self._answers(self.ports[i]))
        wait_for("cluster_state:ok", lambda: all(
            self.node(p).cluster("info")["cluster_state"] == "ok" for p in self.ports))

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, password=PASSWORD)

    def _answers(self, port: int) -> bool:
        try:
            return self.node(port).ping()
        except redis.exceptions.ConnectionError:
            return False

    @property
    def url(self) -> str:
        return ",".join(f"redis://127.0.0.1:{p}" for p in self.ports)

    def client(self) -> redis.RedisCluster:
        return redis.RedisCluster(host="127.0.0.1", port=self.ports[0], password=PASSWORD)

    def ids(self) -> list[str]:
        return [self.node(p).execute_command("CLUSTER MYID").decode() for p in self.ports]

    def reshard(self, source: int, target: int, slots: int) -> subprocess.Popen:
        ids = self.ids()
        return subprocess.Popen(
            ["redis-cli", "-a", PASSWORD, "--no-auth-warning", "--cluster", "reshard",
             f"127.0.0.1:{self.ports[0]}", "--cluster-from", ids[source], "--cluster-to",
             ids[target], "--cluster-slots", str(slots), "--cluster-yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=redis_env(),
            preexec_fn=daemon_harness._die_with_parent)

    def keys_per_node(self) -> list[int]:
        return [self.node(p).dbsize() for p in self.ports]

    def stop(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()


def test_two_nodes_on_a_redis_cluster_resharded_under_traffic(tmp_path: Path, cluster: "Cluster",
                                                             secret: Path) -> None:
    with two_nodes(tmp_path, cluster.url, secret) as (a, b):
        wa, wb = Worker(a, num_blocks=64), Worker(b, num_blocks=64)
        chains = []
        for seed in range(10, 20):
            chains.append((wa.put(seed=seed), wa.slots(0, BLOCKS).copy()))
        written(a, 10 * BLOCKS)
        assert min(cluster.keys_per_node()) > 0  # blocks of one chain spread over every node
        for keys, put in chains[:5]:
            found, got = wb.restore(keys)
            assert found == BLOCKS and np.array_equal(got, put)
        # Half of node 0's slots move to node 1 while A writes and B reads.
        mover = cluster.reshard(0, 1, 2730)
        seed = 20
        while mover.poll() is None:
            chains.append((wa.put(seed=seed), wa.slots(0, BLOCKS).copy()))
            seed += 1
            keys, put = chains[seed % len(chains)]
            wb.client.evict(wb.model, all=True)
            found, got = wb.restore(keys)
            assert np.array_equal(got, put[:, :, :found])  # what comes is right, whatever moves
        assert mover.returncode == 0
        written(a, len(chains) * BLOCKS)
        wb.client.evict(wb.model, all=True)
        for keys, put in chains:
            found, got = wb.restore(keys)
            assert found == BLOCKS and np.array_equal(got, put)
        assert b.metric("rejected_total") == 0
        wa.close()
        wb.close()


def test_a_cluster_node_killed_and_restarted_under_traffic(tmp_path: Path, cluster: "Cluster",
                                                           secret: Path) -> None:
    with two_nodes(tmp_path, cluster.url, secret) as (a, b):
        wa, wb = Worker(a), Worker(b)
        cluster.kill(1)
        wait_for("both nodes to see a node gone", lambda: a.metric("up") == 0 and
                 b.metric("up") == 0)
        # A third of the slots has no node: both go on serving from memory,
        # and what B gets from the rest of the cluster is whole.
        for seed in range(30, 33):
            keys = wa.put(seed=seed)
            assert wa.restore(keys)[0] == BLOCKS
            found, got = wb.restore(keys)
            assert np.array_equal(got, wa.slots(0, found))
        cluster.restart(1)
        wait_for("both nodes reconnected", lambda: a.metric("up") == 1 and b.metric("up") == 1)
        keys = wa.put(seed=40)
        wait_for("A's new chain through the cluster",
                 lambda: wb.restore(keys)[0] == BLOCKS)
        found, got = wb.restore(keys)
        assert np.array_equal(got, wa.slots(0, BLOCKS))
        assert b.metric("rejected_total") == 0
        wa.close()
        wb.close()


# ---- configuration ------------------------------------------------------------------------


def test_a_password_in_the_url_is_warned_about_and_redis_down_at_start_is_no_failure(
        tmp_path: Path) -> None:
    # Nothing listens on port 1: vqkvd starts anyway and serves from memory.
    d = daemon_harness.Daemon(VQKVD, tmp_path, "--remote",
                              "redis://:hunter2-in-the-url@127.0.0.1:1/0")
    try:
        assert "use remote_password_file" in d.log.read_text()
        w = Worker(d)
        keys = w.put(seed=8)
        assert w.restore(keys)[0] == BLOCKS
        w.close()
    finally:
        d.stop()
    assert "hunter2" not in d.log.read_text()


def test_a_bad_remote_stops_the_start(tmp_path: Path) -> None:
    for args, why in ((["--remote", "redis://host-without-port"], "remote"),
                      (["--remote", "unix:///x.sock", "--remote-password-file",
                        str(tmp_path / "absent")], "remote_password_file")):
        log = tmp_path / "vqkvd.log"
        with open(log, "w") as f:
            rc = subprocess.run([VQKVD, "--config", "/dev/null", "--socket",
                                 str(tmp_path / "s.sock"), *args], stderr=f,
                                env=daemon_harness.daemon_env(), timeout=HANG_GUARD_S).returncode
        assert rc != 0 and why in log.read_text(), log.read_text()
