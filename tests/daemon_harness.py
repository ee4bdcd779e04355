"""daemon_harness.py -- what the Python tests that run vqkvd as a process share.

The Python side of daemon_harness.h: vqkvd started from a path (ctest passes
the built binary in VQKVD_PATH) on a socket in a directory of the test's,
with an empty config file (no installed vqkvd.conf applies) and a state dir
there too, its stderr in a file; stop() sends SIGTERM and wants exit status
0, so under ASan a leak in the daemon fails the test. The daemon dies with
the test process (PR_SET_PDEATHSIG), so a failed test never leaves one
holding ctest's pipe open.

A test process that runs with a preloaded ASan runtime of its own (Python
loading an ASan build of libvqkv) cannot check itself for leaks; it sets
VQKVD_ASAN_OPTIONS to the options the daemon should have instead, and the
daemon gets no LD_PRELOAD (it links its own runtime).
"""

import ctypes
import importlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

# Guards against a daemon that hangs on start or stop; never a timing check.
HANG_GUARD_S = 60
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM when the test process goes."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def daemon_env() -> dict[str, str]:
    """The environment vqkvd runs with: this process's, ASan settings its own."""
    env = dict(os.environ)
    if "VQKVD_ASAN_OPTIONS" in env:
        env["ASAN_OPTIONS"] = env.pop("VQKVD_ASAN_OPTIONS")
        env.pop("LD_PRELOAD", None)
    return env


def run_script(script: str, needs: list[str]) -> None:
    """Runs a test script under pytest with the project's .venv, or exits 77 (skipped, loudly).

    For the scripts ctest runs directly: re-executes script with .venv's
    Python (tools/bootstrap.sh makes it) unless it already runs there, checks
    that the modules in needs import, then exits with pytest's status. When
    VQKV_LIBRARY names an ASan build of libvqkv, its runtime is preloaded (it
    loads into Python no other way) and the daemon keeps its own leak check
    (VQKVD_ASAN_OPTIONS, read by daemon_env).
    """
    name = Path(script).stem
    venv = Path(__file__).resolve().parent.parent / ".venv"
    if Path(sys.prefix).resolve() != venv.resolve():
        if not (venv / "bin" / "python").exists():
            print(f"SKIPPED: {name} needs .venv with tools/requirements.txt "
                  "(run tools/bootstrap.sh)")
            sys.exit(77)
        library = os.environ.get("VQKV_LIBRARY", "")
        ldd = subprocess.run(["ldd", library], capture_output=True, text=True).stdout \
            if library else ""
        asan = re.search(r"^\s*libasan\.so\S* => (\S+)", ldd, re.M)
        if asan:
            os.environ["VQKVD_ASAN_OPTIONS"] = os.environ.get("ASAN_OPTIONS", "")
            os.environ["ASAN_OPTIONS"] = "detect_leaks=0"
            os.environ["LD_PRELOAD"] = asan.group(1)
        os.execv(venv / "bin" / "python", [str(venv / "bin" / "python"), script])
    try:
        for module in ["pytest", *needs]:
            importlib.import_module(module)
    except ImportError as e:
        print(f"SKIPPED: {name} needs {e.name} in .venv (run tools/bootstrap.sh)")
        sys.exit(77)
    import pytest

    sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", script]))


class Daemon:
    """vqkvd on directory/vqkv.sock; ready(), when given, must also be true before the start is done."""

    def __init__(
        self,
        vqkvd: str,
        directory: "str | os.PathLike[str]",
        *args: str,
        config_text: str = "",
        pool_bytes: int = 64 << 20,
        ready: "Callable[[], bool] | None" = None,
    ) -> None:
        directory = Path(directory)
        self.url: "str | None" = None  # the metrics endpoint's (found_metrics_url)
        self.log = directory / "vqkvd.log"
        self.socket = directory / "vqkv.sock"
        self.pool_bytes = pool_bytes
        config = directory / "daemon.conf"
        config.write_text(config_text)
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [
                    vqkvd,
                    "--config",
                    str(config),
                    "--socket",
                    str(self.socket),
                    "--state-dir",
                    str(directory / "state"),
                    "--pool-bytes",
                    str(pool_bytes),
                    *args,
                ],
                stdin=subprocess.DEVNULL,
                stderr=log,
                env=daemon_env(),
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + HANG_GUARD_S
        while not self.listening() or (ready is not None and not ready()):
            assert self.proc.poll() is None, f"vqkvd exited: {self.log.read_text()}"
            assert time.monotonic() < deadline, f"vqkvd did not start: {self.log.read_text()}"
            time.sleep(0.02)

    def found_metrics_url(self) -> bool:
        """Whether the log names the metrics endpoint yet; url is then its http://HOST:PORT."""
        m = re.search(r"metrics on (http://\S+)/metrics", self.log.read_text())
        self.url = m.group(1) if m else None
        return self.url is not None

    def listening(self) -> bool:
        """Whether a connection is accepted: the socket file appears at bind(), before listen()."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(self.socket))
            except OSError:
                return False
        return True

    def stop(self) -> None:
        """SIGTERM, then exit status 0 wanted."""
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(HANG_GUARD_S)
        assert rc == 0, f"vqkvd exited with {rc}: {self.log.read_text()}"
