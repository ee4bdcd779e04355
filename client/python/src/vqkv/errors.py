"""Errors: every failed libvqkv call becomes a :class:`VqkvError`.

libvqkv reports failures as negative ``VQKV_E*`` codes, the daemon's own code
passed through for a refused request, with its message kept by the client
(``vqkv_last_error``). The exception carries all three: ``code`` (the negative
int), ``name`` (``vqkv_client_strerror`` of it) and ``message``. The codes a
caller is likely to handle get a subclass of their own (a refused slot is an
:class:`OutOfRangeError`, an expired lease a :class:`LeaseError`); the others
raise :class:`VqkvError` itself. Some subclasses also derive from the
matching builtin (``ValueError``, ``PermissionError``, ``TimeoutError``,
``ConnectionError``), so code that does not know vqkv still catches them.
"""

from __future__ import annotations

import enum

__all__ = [
    "ErrorCode",
    "VqkvError",
    "InvalidArgumentError",
    "CodecSpecError",
    "OutOfRangeError",
    "MismatchError",
    "HandleError",
    "LeaseError",
    "LimitError",
    "PermissionDeniedError",
    "QuotaError",
    "MapError",
    "DaemonTimeoutError",
    "ConnectionLostError",
    "error_from_code",
]


class ErrorCode(enum.IntEnum):
    """The ``VQKV_E*`` codes of vqkv_codec.h (-1 to -99) and vqkv_errors.h (-100 on)."""

    EINVAL = -1
    ESPEC = -2
    ERANGE = -3
    ENOMEM = -4
    ENOCODEBOOK = -5
    EIO = -6
    EFORMAT = -7
    EMISMATCH = -8
    ETOOBIG = -100
    EMALFORMED = -101
    EUNKNOWN = -102
    EFDS = -103
    ECLOSED = -104
    ETRUNC = -105
    EAGAIN = -106
    EVERSION = -107
    EPROTO = -108
    EHANDLE = -109
    ELEASE = -110
    ELIMIT = -111
    EPERM = -112
    EQUOTA = -113
    EMAP = -114


class VqkvError(Exception):
    """A libvqkv call failed.

    Attributes:
        code: the negative ``VQKV_E*`` code: an :class:`ErrorCode` when it is
            one this package knows, else the plain int.
        name: libvqkv's name for the code (``vqkv_client_strerror``).
        message: the daemon's message for a refused request, or libvqkv's own
            for a local failure; may be empty.
    """

    def __init__(self, code: int, name: str, message: str = "") -> None:
        known = code in ErrorCode._value2member_map_
        self.code: int = ErrorCode(code) if known else code
        self.name = name
        self.message = message
        super().__init__(f"{name} ({code}): {message}" if message else f"{name} ({code})")


class InvalidArgumentError(VqkvError, ValueError):
    """``VQKV_EINVAL``: an argument is out of its domain (checked locally or by the daemon)."""


class CodecSpecError(VqkvError, ValueError):
    """``VQKV_ESPEC``: the daemon does not know the codec spec."""


class OutOfRangeError(VqkvError, IndexError):
    """``VQKV_ERANGE``: a slot or stride reaches outside the region; nothing was read or written."""


class MismatchError(VqkvError):
    """``VQKV_EMISMATCH``: a model id registered with another layout, codec or codebooks."""


class HandleError(VqkvError):
    """``VQKV_EHANDLE``: an unknown model or region handle."""


class LeaseError(VqkvError):
    """``VQKV_ELEASE``: an unknown or expired lease."""


class LimitError(VqkvError):
    """``VQKV_ELIMIT``: one of the daemon's per-connection limits is reached."""


class PermissionDeniedError(VqkvError, PermissionError):
    """``VQKV_EPERM``: the daemon does not let this peer connect or make this request."""


class QuotaError(VqkvError):
    """``VQKV_EQUOTA``: the tenant's byte quota is used up."""


class MapError(VqkvError):
    """``VQKV_EMAP``: the daemon could not open, seal or map the region's memory."""


class DaemonTimeoutError(VqkvError, TimeoutError):
    """``VQKV_EAGAIN``: no reply within the client's timeout (a late one is skipped)."""


class ConnectionLostError(VqkvError, ConnectionError):
    """``VQKV_ECLOSED``/``VQKV_ETRUNC``: the connection is gone; open a new client."""


_SUBCLASSES: dict[int, type[VqkvError]] = {
    ErrorCode.EINVAL: InvalidArgumentError,
    ErrorCode.ESPEC: CodecSpecError,
    ErrorCode.ERANGE: OutOfRangeError,
    ErrorCode.EMISMATCH: MismatchError,
    ErrorCode.EHANDLE: HandleError,
    ErrorCode.ELEASE: LeaseError,
    ErrorCode.ELIMIT: LimitError,
    ErrorCode.EPERM: PermissionDeniedError,
    ErrorCode.EQUOTA: QuotaError,
    ErrorCode.EMAP: MapError,
    ErrorCode.EAGAIN: DaemonTimeoutError,
    ErrorCode.ECLOSED: ConnectionLostError,
    ErrorCode.ETRUNC: ConnectionLostError,
}


def error_from_code(code: int, name: str, message: str = "") -> VqkvError:
    """The exception for ``code``: its subclass when it has one, else :class:`VqkvError`."""
    return _SUBCLASSES.get(code, VqkvError)(code, name, message)
