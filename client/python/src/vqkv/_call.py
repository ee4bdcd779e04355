"""Turning libvqkv's return codes into exceptions (see :mod:`vqkv.errors`)."""

from __future__ import annotations

import ctypes
import os

from . import _native
from .errors import ErrorCode, VqkvError, error_from_code

# vqkv.h: a call that fails to reconnect says so first in its message.
_RECONNECTING = "reconnecting"


def describe(code: int) -> str:
    """libvqkv's words for a code (``vqkv_client_strerror``)."""
    text: bytes = _native.lib().vqkv_client_strerror(code)
    return text.decode(errors="replace")


def invalid(message: str) -> VqkvError:
    """The error for an argument refused before anything was sent (``EINVAL``)."""
    return error_from_code(ErrorCode.EINVAL, describe(ErrorCode.EINVAL), message)


def check(rc: int, client: ctypes.c_void_p, what: str) -> int:
    """``rc`` when it is not negative, else raises its error with the client's last message.

    ``what`` names the call, for a failure the library left without a message.
    """
    if rc >= 0:
        return rc
    raw: bytes = _native.lib().vqkv_last_error(client)
    message = raw.decode(errors="replace")
    raise error_from_code(
        rc, describe(rc), message or what, connecting=message.startswith(_RECONNECTING)
    )


def check_local(rc: int, what: str, *, connecting: bool = False) -> int:
    """Like :func:`check`, for the calls made without a client (connect, memfd_create).

    Their only message is ``errno``, meaningful for ``EIO``; ``connecting``
    is :func:`vqkv.errors.error_from_code`'s.
    """
    if rc >= 0:
        return rc
    message = what
    if rc == ErrorCode.EIO:
        message += f": {os.strerror(ctypes.get_errno())}"
    raise error_from_code(rc, describe(rc), message, connecting=connecting)


def error_closed() -> VqkvError:
    """The error for a call on a client after :meth:`vqkv.Client.close` (``ECLOSED``)."""
    return error_from_code(ErrorCode.ECLOSED, describe(ErrorCode.ECLOSED), "the client is closed")
