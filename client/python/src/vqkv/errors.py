"""Errors: every failed libvqkv call becomes a :class:`VqkvError`.

libvqkv reports failures as negative ``VQKV_E*`` codes, the daemon's own code
passed through for a refused request, with its message kept by the client
(``vqkv_last_error``). The exception carries ``code`` (the negative int),
``name`` (the code's ``VQKV_E*`` name in the C headers, such as
``"VQKV_ECLOSED"``), ``description`` (``vqkv_client_strerror`` of it) and
``message``. The codes a caller is likely to handle get a subclass of their
own (a refused slot is an :class:`OutOfRangeError`, an expired lease a
:class:`LeaseError`); the others raise :class:`VqkvError` itself. Some
subclasses also derive from the matching builtin (``ValueError``,
``PermissionError``, ``TimeoutError``, ``ConnectionError``), so code that
does not know vqkv still catches them.

Both failures to talk to the daemon derive from ``ConnectionError``:
:class:`DaemonUnreachableError` when there is no daemon to connect to (the
socket is missing, refuses the connection or is not a socket), whether in
:class:`vqkv.Client` or in a call reconnecting after the daemon went away,
and :class:`ConnectionLostError` when an open connection breaks.
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
    "DaemonUnreachableError",
    "code_name",
    "error_from_code",
]


class ErrorCode(enum.IntEnum):
    """The ``VQKV_E*`` codes of vqkv_codec.h (-1 to -99) and vqkv_errors.h (-100 on).

    Each member is its C name without ``VQKV_`` (:func:`code_name` puts it back).
    """

    EINVAL = -1
    ESPEC = -2
    ERANGE = -3
    ENOMEM = -4
    ENOCODEBOOK = -5
    EIO = -6
    EFORMAT = -7
    EMISMATCH = -8
    EDEVICE = -9
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
    EEXIST = -115
    ENOENT = -116
    ENOPARENT = -117


def code_name(code: int) -> str:
    """The C name of ``code``, such as ``"VQKV_ECLOSED"``.

    A code this package does not know (from a newer daemon) reads
    ``"VQKV_E(-199)"``: still recognisable as a vqkv code, and not a real name.
    """
    if code in ErrorCode._value2member_map_:
        return f"VQKV_{ErrorCode(code).name}"
    return f"VQKV_E({code})"


class VqkvError(Exception):
    """A libvqkv call failed.

    Attributes:
        code: the negative ``VQKV_E*`` code: an :class:`ErrorCode` when it is
            one this package knows, else the plain int.
        name: the code's C name, such as ``"VQKV_EHANDLE"`` (:func:`code_name`).
        description: libvqkv's words for the code (``vqkv_client_strerror``).
        message: the daemon's message for a refused request, or libvqkv's own
            for a local failure; may be empty.
    """

    def __init__(self, code: int, description: str, message: str = "") -> None:
        known = code in ErrorCode._value2member_map_
        self.code: int = ErrorCode(code) if known else code
        self.name = code_name(code)
        self.description = description
        self.message = message
        head = f"{self.name} ({code}, {description})"
        super().__init__(f"{head}: {message}" if message else head)


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


class DeviceError(VqkvError):
    """``VQKV_EDEVICE``: no CUDA driver or device, a CUDA call failed, or the daemon does not own the GPU."""


class DaemonTimeoutError(VqkvError, TimeoutError):
    """``VQKV_EAGAIN``: no reply within the client's timeout (a late one is skipped)."""


class ConnectionLostError(VqkvError, ConnectionError):
    """``VQKV_ECLOSED``/``VQKV_ETRUNC``: the connection broke under a call.

    The call may or may not have taken effect; the client's next call
    reconnects (keys computed before then must be computed again). Also
    raised for a call on a closed :class:`vqkv.Client`.
    """


class DaemonUnreachableError(VqkvError, ConnectionError):
    """``VQKV_EIO`` while connecting or reconnecting: no daemon answers on the socket.

    The message names the socket and the OS's reason (no such file,
    connection refused, permission denied). Start vqkvd, or pass its socket.
    """


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
    ErrorCode.EDEVICE: DeviceError,
    ErrorCode.EAGAIN: DaemonTimeoutError,
    ErrorCode.ECLOSED: ConnectionLostError,
    ErrorCode.ETRUNC: ConnectionLostError,
}


def error_from_code(code: int, description: str, message: str = "", *, connecting: bool = False) -> VqkvError:
    """The exception for ``code``: its subclass when it has one, else :class:`VqkvError`.

    ``connecting`` says the call was (re)connecting, where ``EIO`` can only
    mean the socket could not be reached; elsewhere it is a local I/O failure.
    """
    if connecting and code == ErrorCode.EIO:
        return DaemonUnreachableError(code, description, message)
    return _SUBCLASSES.get(code, VqkvError)(code, description, message)
