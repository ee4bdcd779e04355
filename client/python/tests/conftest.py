"""Fixtures of the vqkv package's tests: a fresh vqkvd per test and clients of it.

The daemon is the built binary named by VQKVD_PATH (ctest sets it, with
VQKVCTL_PATH and VQKV_LIBRARY), started by tests/daemon_harness.py on a socket
in a fresh short-named directory with an empty config and a state dir of its
own; it must exit 0 on SIGTERM after the test. Without VQKVD_PATH every test
here is skipped, saying so.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))

from daemon_harness import Daemon  # noqa: E402

import vqkv  # noqa: E402

VQKVD = os.environ.get("VQKVD_PATH", "")
VQKVCTL = os.environ.get("VQKVCTL_PATH", "")
POOL_BYTES = 64 << 20


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skips every test, loudly, when there is no daemon binary to run."""
    if not os.access(VQKVD, os.X_OK):
        skip = pytest.mark.skip(reason="VQKVD_PATH must name the built vqkvd (ctest sets it)")
        for item in items:
            item.add_marker(skip)


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    """A vqkvd of the test's own; the socket path stays short (sun_path holds 108 bytes)."""
    directory = tempfile.mkdtemp(prefix="vqkv-py.")
    d = Daemon(VQKVD, directory, pool_bytes=POOL_BYTES)
    try:
        yield d
    finally:
        d.stop()
        shutil.rmtree(directory)


@pytest.fixture
def client(daemon: Daemon) -> Iterator[vqkv.Client]:
    """A client of the test's daemon, closed after the test."""
    with vqkv.Client(str(daemon.socket), name="pytest", timeout_ms=30000) as c:
        yield c


@pytest.fixture
def vqkvctl() -> str:
    """The built vqkvctl (VQKVCTL_PATH); the test is skipped without it."""
    if not os.access(VQKVCTL, os.X_OK):
        pytest.skip("VQKVCTL_PATH must name the built vqkvctl (ctest sets it)")
    return VQKVCTL
