"""The error codes and classes, held to the C headers; no daemon or library needed.

test_client.py raises them for real (a socket with no daemon, a daemon that stops).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import vqkv
from vqkv.errors import error_from_code

ROOT = Path(__file__).resolve().parents[3]
HEADERS = [ROOT / "kernels" / "vqkv_codec.h", ROOT / "proto" / "vqkv_errors.h"]


def c_codes() -> dict[str, int]:
    """Every ``VQKV_E* = -N`` enumerator of the headers the codes live in."""
    codes: dict[str, int] = {}
    for header in HEADERS:
        for name, value in re.findall(r"\b(VQKV_E[A-Z]+)\s*=\s*(-\d+)", header.read_text()):
            codes[name] = int(value)
    return codes


def test_every_c_code_has_its_name() -> None:
    codes = c_codes()
    assert codes["VQKV_EDEVICE"] == -9 and codes["VQKV_ECLOSED"] == -104
    assert {vqkv.code_name(c): int(c) for c in vqkv.ErrorCode} == codes
    for name, value in codes.items():
        e = error_from_code(value, "words", "message")
        assert (e.code, e.name, e.description, e.message) == (value, name, "words", "message")
        assert str(e) == f"{name} ({value}, words): message"


def test_a_code_from_a_newer_daemon_keeps_its_number() -> None:
    e = error_from_code(-199, "unknown error")
    assert (e.code, e.name) == (-199, "VQKV_E(-199)")
    assert type(e) is vqkv.VqkvError and str(e) == "VQKV_E(-199) (-199, unknown error)"


@pytest.mark.parametrize("code", [vqkv.ErrorCode.ECLOSED, vqkv.ErrorCode.ETRUNC])
def test_a_broken_connection_is_a_connection_error(code: vqkv.ErrorCode) -> None:
    e = error_from_code(code, "")
    assert isinstance(e, vqkv.ConnectionLostError)
    assert isinstance(e, ConnectionError) and isinstance(e, vqkv.VqkvError)


def test_eio_is_a_connection_error_only_when_connecting() -> None:
    e = error_from_code(vqkv.ErrorCode.EIO, "", "connect to /x: No such file or directory", connecting=True)
    assert isinstance(e, vqkv.DaemonUnreachableError)
    assert isinstance(e, ConnectionError) and isinstance(e, vqkv.VqkvError)
    assert e.name == "VQKV_EIO"
    local = error_from_code(vqkv.ErrorCode.EIO, "", "memfd_create: Too many open files")
    assert type(local) is vqkv.VqkvError
    # Connecting changes nothing for the other codes.
    assert type(error_from_code(vqkv.ErrorCode.EPERM, "", connecting=True)) is vqkv.PermissionDeniedError
