"""bench/restore.py, the restore-vs-recompute benchmark, checked on the CPU:
a tiny Llama shape through this build's vqkvd (a memfd cache, no GPU). It
holds what the benchmark reports, never how fast: the fp16 prefix comes back
byte for byte, a lossy codec within its error, every row has its figures.

Skips without torch (not in tools/requirements.txt: examples/requirements.txt
installs it) or without the build's vqkvd.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VQKVD = ROOT / "build" / "daemon" / "vqkvd"

pytest.importorskip("torch")
needs_daemon = pytest.mark.skipif(not VQKVD.exists(), reason="vqkvd not built")


def run_restore(tmp_path: Path, codec: str) -> dict:
    out = tmp_path / f"{codec}.json"
    cmd = [sys.executable, str(ROOT / "bench" / "restore.py"), "--device", "cpu", "--shape", "tiny",
           "--tokens", "64,128", "--repeats", "1", "--codec", codec, "--warmup-tokens", "512",
           "--vqkvd", str(VQKVD), "--json", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "restore vs recompute: tiny" in done.stdout
    return json.loads(out.read_text())


@needs_daemon
def test_fp16_prefix_restores_byte_for_byte(tmp_path: Path) -> None:
    report = run_restore(tmp_path, "fp16")
    assert [r["tokens"] for r in report["rows"]] == [64, 128]
    for r in report["rows"]:
        assert r["exact"] and r["rel_error"] == 0.0
        assert r["blocks"] == r["tokens"] // 16
        for k in ("prefill_ms", "restore_ms", "copy_ms", "restore_gbps", "speedup"):
            assert r[k] > 0


@needs_daemon
def test_vq_codec_calibrates_then_restores_within_its_error(tmp_path: Path) -> None:
    report = run_restore(tmp_path, "rvq")
    for r in report["rows"]:
        assert not r["exact"]
        assert 0.0 < r["rel_error"] < 0.5  # 2.25 bits a value on Gaussian KV
