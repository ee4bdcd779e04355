"""Turning libvqkv's return codes into exceptions (see :mod:`vqkv.errors`)."""

from __future__ import annotations

import ctypes
import os

from . import _native
from .errors import ErrorCode, VqkvError, error_from_code


def code_name(code: int) -> str:
    """libvqkv's name for a code (``vqkv_client_strerror``)."""
    name: bytes = _native.lib().vqkv_client_strerror(code)
    return name.decode(errors="replace")


def invalid(message: str) -> VqkvError:
    """The error for an argument refused before anything was sent (``EINVAL``)."""
    return error_from_code(ErrorCode.EINVAL, code_name(ErrorCode.EINVAL), message)


def check(rc: int, client: ctypes.c_void_p, what: str) -> int:
    """``rc`` when it is not negative, else raises its error with the client's last message.

    ``what`` names the call, for a failure the library left without a message.
    """
    if rc >= 0:
        return rc
    message: bytes = _native.lib().vqkv_last_error(client)
    raise error_from_code(rc, code_name(rc), message.decode(errors="replace") or what)


def check_local(rc: int, what: str) -> int:
    """Like :func:`check`, for the calls made without a client (connect, memfd_create).

    Their only message is ``errno``, meaningful for ``EIO``.
    """
    if rc >= 0:
        return rc
    message = what
    if rc == ErrorCode.EIO:
        message += f": {os.strerror(ctypes.get_errno())}"
    raise error_from_code(rc, code_name(rc), message)


def error_closed() -> VqkvError:
    """The error for a call on a client after :meth:`vqkv.Client.close` (``ECLOSED``)."""
    return error_from_code(ErrorCode.ECLOSED, code_name(ErrorCode.ECLOSED), "the client is closed")
