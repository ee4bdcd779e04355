#!/usr/bin/env python3
"""vqkvd's metrics endpoint (daemon/metrics.h, docs/METRICS.md) through the binary.

A vqkvd started with --metrics-address 127.0.0.1:0 gets a known load from
tests/metrics_traffic.c (puts, lookups with known hits and misses, a get,
a refused release, pins); /metrics, read with urllib and parsed with
prometheus_client's own parser, must count exactly that, for the daemon and
for this uid's tenant, while the worker is connected and after it left.
Also: /healthz, the 404 and 405 answers, loopback-only addresses (anything
else is refused with exit status 2, from the flag and from the file) and
no listening TCP socket at all unless an address is configured.

ctest runs this file as a script: it re-runs itself with the project's
.venv (tools/bootstrap.sh) and skips, loudly, with exit status 77 when there
is none. The binaries come from VQKVD_PATH and METRICS_TRAFFIC_PATH.
"""
import json
import os
import subprocess
import time
import sys
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VQKVD = os.environ.get("VQKVD_PATH", "")
TRAFFIC = os.environ.get("METRICS_TRAFFIC_PATH", "")
NO_BINARIES = ("SKIPPED: VQKVD_PATH and METRICS_TRAFFIC_PATH must name the built binaries "
               "(ctest sets them)")

if __name__ == "__main__":
    if not (os.access(VQKVD, os.X_OK) and os.access(TRAFFIC, os.X_OK)):
        print(NO_BINARIES)
        sys.exit(77)
    import daemon_harness

    daemon_harness.run_script(__file__, ["prometheus_client"])

import daemon_harness  # noqa: E402
import pytest  # noqa: E402
from daemon_harness import HANG_GUARD_S  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

if not (os.access(VQKVD, os.X_OK) and os.access(TRAFFIC, os.X_OK)):
    pytest.skip(NO_BINARIES, allow_module_level=True)

# What metrics_traffic does (its header): a chain of BLOCKS blocks put in
# PUTS requests, LOOKUPS lookups of it extended by EXTRA blocks never put,
# one get, PINS blocks pinned; its model's layout gives the logical bytes.
BLOCKS, PUTS, LOOKUPS, EXTRA, PINS = 8, 2, 3, 2, 3
LAYERS, KV_HEADS, HEAD_DIM, BLOCK_TOKENS, F16_BYTES = 2, 2, 64, 16, 2
LOGICAL_BLOCK = LAYERS * 2 * KV_HEADS * HEAD_DIM * BLOCK_TOKENS * F16_BYTES
POOL_BYTES = 64 << 20


class Daemon(daemon_harness.Daemon):
    """vqkvd on a socket in tmp_path, with url set when a metrics address is configured."""

    def __init__(self, tmp_path, *args, config_text=""):
        metrics = bool(args) or "metrics_address" in config_text
        super().__init__(VQKVD, tmp_path, *args, config_text=config_text, pool_bytes=POOL_BYTES,
                         ready=self.found_metrics_url if metrics else None)


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path, "--metrics-address", "127.0.0.1:0")
    yield d
    d.stop()


def fetch(url, method="GET"):
    """(status, headers, body) of a request; HTTP errors are answers too."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method,
                                                           data=b"x" if method == "POST" else None),
                                    timeout=HANG_GUARD_S) as r:
            return r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode()


def scrape(d):
    """{(sample name, frozenset of labels): value} of /metrics."""
    status, headers, body = fetch(d.url + "/metrics")
    assert status == 200, body
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def value(samples, name, **labels):
    return samples[(name, frozenset(labels.items()))]


def labelled(samples, name, label):
    """{label value: sample value} of every sample of name."""
    return {dict(k[1])[label]: v for k, v in samples.items() if k[0] == name}


def tcp_listening_ports(pid):
    """Ports of the TCP sockets pid listens on, from /proc."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[len("socket:["):-1])
    ports = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        with open(table) as f:
            for row in f.read().splitlines()[1:]:
                fields = row.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    ports.append(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_metrics_count_the_traffic(daemon):
    worker = subprocess.Popen(
        [TRAFFIC, str(daemon.socket), str(BLOCKS), str(PUTS), str(LOOKUPS), str(EXTRA), str(PINS)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = worker.stdout.readline()
    assert line, f"metrics_traffic failed (exit {worker.wait()})"
    done = json.loads(line)
    assert done["logical_bytes"] == LOGICAL_BLOCK
    assert done["tenant"] == str(os.getuid())
    stored = BLOCKS * done["block_bytes"]
    logical = BLOCKS * LOGICAL_BLOCK

    s = scrape(daemon)
    assert value(s, "vqkv_lookup_hits_total") == LOOKUPS * BLOCKS
    assert value(s, "vqkv_lookup_misses_total") == LOOKUPS * EXTRA
    assert value(s, "vqkv_blocks_inserted_total") == BLOCKS
    assert value(s, "vqkv_evictions_total") == 0
    assert value(s, "vqkv_blocks") == BLOCKS
    assert value(s, "vqkv_stored_bytes") == stored
    assert value(s, "vqkv_logical_bytes") == logical
    assert value(s, "vqkv_compression_ratio") == pytest.approx(logical / stored, rel=1e-5)
    assert value(s, "vqkv_pool_capacity_bytes") == POOL_BYTES
    assert 0 < value(s, "vqkv_pool_used_bytes") <= POOL_BYTES
    assert value(s, "vqkv_clients") == 1
    assert value(s, "vqkv_models") == 1
    assert value(s, "vqkv_regions") == 1
    assert value(s, "vqkv_connection_pins") == PINS
    assert value(s, "vqkv_leases") == 1  # the last lookup's, held
    # The puts with new blocks replied before their encode (staging is on
    # by default); none found staging full.
    assert value(s, "vqkv_puts_staged_total") >= 1
    assert value(s, "vqkv_puts_staging_full_total") == 0
    assert 0 <= value(s, "vqkv_encode_backlog_blocks") <= BLOCKS
    # Every request, by type: the last lookup's lease is not released, and
    # one more Release names a lease that does not exist.
    assert labelled(s, "vqkv_requests_total", "type") == {
        "hello": 1, "register_model": 1, "register_region": 1, "put": PUTS,
        "lookup": LOOKUPS, "get": 1, "release": LOOKUPS, "pin": 1}
    assert labelled(s, "vqkv_errors_total", "code") == {"-110": 1}  # VQKV_ELEASE
    for kind, count in (("put", PUTS), ("get", 1)):
        assert value(s, "vqkv_request_duration_seconds_count", type=kind) == count
        buckets = sorted((float(dict(k[1])["le"]), v) for k, v in s.items()
                         if k[0] == "vqkv_request_duration_seconds_bucket"
                         and dict(k[1])["type"] == kind)
        assert len(buckets) > 1 and buckets[-1] == (float("inf"), count)
        assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative
        assert value(s, "vqkv_request_duration_seconds_sum", type=kind) > 0
    # The tenant is this test's uid, and it is the only one.
    tenant = str(os.getuid())
    for name, want in (("vqkv_tenant_lookup_hits_total", LOOKUPS * BLOCKS),
                       ("vqkv_tenant_lookup_misses_total", LOOKUPS * EXTRA),
                       ("vqkv_tenant_evictions_total", 0), ("vqkv_tenant_blocks", BLOCKS),
                       ("vqkv_tenant_stored_bytes", stored), ("vqkv_tenant_logical_bytes", logical),
                       ("vqkv_tenant_quota_bytes", 0)):
        assert labelled(s, name, "tenant") == {tenant: want}, name
    info = [dict(k[1]) for k in s if k[0] == "vqkv_build_info"]
    assert len(info) == 1 and info[0]["backend"] == "cpu" and info[0]["version"]

    # The worker leaves: its connection, region, lease and pins go; the
    # blocks and the model stay.
    worker.stdin.close()
    assert worker.wait() == 0
    s = scrape(daemon)
    assert value(s, "vqkv_clients") == 0
    assert value(s, "vqkv_regions") == 0
    assert value(s, "vqkv_connection_pins") == 0
    assert value(s, "vqkv_leases") == 0
    assert value(s, "vqkv_blocks") == BLOCKS
    # Every staged block gets encoded and its stage freed.
    deadline = time.monotonic() + 60
    while (value(s, "vqkv_encode_backlog_blocks") or value(s, "vqkv_staging_bytes")) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
        s = scrape(daemon)
    assert value(s, "vqkv_encode_backlog_blocks") == 0
    assert value(s, "vqkv_staging_bytes") == 0
    assert value(s, "vqkv_models") == 1


def test_health_and_routes(daemon):
    status, _, body = fetch(daemon.url + "/healthz")
    assert (status, body) == (200, "ok\n")
    status, _, body = fetch(daemon.url + "/metrics", method="HEAD")
    assert (status, body) == (200, "")
    assert fetch(daemon.url + "/")[0] == 404
    assert fetch(daemon.url + "/metrics/x")[0] == 404
    for path in ("/metrics", "/healthz"):
        status, headers, _ = fetch(daemon.url + path, method="POST")
        assert status == 405
        assert headers["Allow"] == "GET, HEAD"
    # The endpoint is the one TCP socket the daemon listens on.
    port = int(daemon.url.rsplit(":", 1)[1])
    assert tcp_listening_ports(daemon.proc.pid) == [port]


def test_metrics_are_off_by_default(tmp_path):
    d = Daemon(tmp_path)
    try:
        assert tcp_listening_ports(d.proc.pid) == []
        assert "metrics on" not in d.log.read_text()
    finally:
        d.stop()


def check_config(tmp_path, text, *args):
    config = tmp_path / "vqkvd.conf"
    config.write_text(text)
    r = subprocess.run([VQKVD, "--check-config", "--config", str(config), *args],
                       capture_output=True, text=True)
    return r.returncode, r.stdout + r.stderr


@pytest.mark.parametrize("address", ["127.0.0.1:9464", "127.3.2.1:0", "[::1]:9464",
                                     "localhost:9464"])
def test_loopback_addresses_are_taken(tmp_path, address):
    assert check_config(tmp_path, "", "--metrics-address", address) == (0, "ok\n")
    assert check_config(tmp_path, f"[vqkvd]\nmetrics_address = {address}\n") == (0, "ok\n")


@pytest.mark.parametrize("address", ["0.0.0.0:9464", "192.0.2.1:9464", "[::]:9464",
                                     "[2001:db8::1]:9464", "[::ffff:127.0.0.1]:9464",
                                     "example.com:9464", "127.0.0.1", "127.0.0.1:65536",
                                     "127.0.0.1:-1", ":9464"])
def test_other_addresses_are_refused(tmp_path, address):
    rc, out = check_config(tmp_path, "", "--metrics-address", address)
    assert rc == 2 and f'bad --metrics-address "{address}"' in out and "loopback" in out, out
    rc, out = check_config(tmp_path, f"[vqkvd]\n\nmetrics_address = {address}\n")
    assert rc == 2 and f'vqkvd.conf:3: bad metrics_address "{address}"' in out, out


def test_address_from_the_file_and_the_flag_over_it(tmp_path):
    d = Daemon(tmp_path, config_text="[vqkvd]\nmetrics_address = 127.0.0.1:0\n")
    try:
        assert d.url.startswith("http://127.0.0.1:")
        assert fetch(d.url + "/healthz")[0] == 200
    finally:
        d.stop()
    d = Daemon(tmp_path, "--metrics-address", "127.0.0.1:0",
               config_text="[vqkvd]\nmetrics_address = [::1]:0\n")
    try:
        assert d.url.startswith("http://127.0.0.1:")
    finally:
        d.stop()
