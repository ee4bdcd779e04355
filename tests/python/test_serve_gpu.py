"""bench/serve_gpu.py, gets and puts through vqkvd from worker processes,
checked on the CPU: a tiny shape, memfd caches, this build's vqkvd, 1 and 2
workers. It holds what the benchmark reports, never how fast: every row has
gets and puts from every worker count and the baseline, and no kernel
figure without a GPU.

Skips without torch or without the build's vqkvd.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VQKVD = ROOT / "build" / "daemon" / "vqkvd"

pytest.importorskip("torch")


@pytest.mark.skipif(not VQKVD.exists(), reason="vqkvd not built")
def test_gets_and_puts_from_worker_processes(tmp_path: Path) -> None:
    out = tmp_path / "serve_gpu.json"
    cmd = [sys.executable, str(ROOT / "bench" / "serve_gpu.py"), "--device", "cpu", "--shape", "tiny",
           "--codecs", "fp16", "--sizes", "256K", "--workers", "1,2", "--seconds", "0.3",
           "--vqkvd", str(VQKVD), "--json", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["workers"] for r in rows] == [1, 2]
    for r in rows:
        assert r["codec"] == "fp16" and r["logical_bytes"] == 256 * 1024
        assert r["gets"] >= r["workers"] and r["puts"] >= r["workers"]
        for k in ("get_gbps", "get_p50_ms", "put_gbps", "put_p50_ms", "copy_gbps"):
            assert r[k] > 0
        assert r["get_p99_ms"] >= r["get_p50_ms"]
        assert r["kernel_decode_gbps"] is None
