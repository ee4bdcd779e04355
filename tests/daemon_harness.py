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
import os
import signal
import socket
import subprocess
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
