"""The ctypes face of libvqkv: finding the shared library and declaring its functions.

Everything here mirrors ``vqkv.h`` and ``vqkv_codec.h`` one to one; the rest of
the package builds the Python API on top and is the only user of this module.
The library is loaded on first use, not at import, so ``import vqkv`` works
(for type checkers, documentation, a process that only builds layouts)
on a machine without it.

Where the library comes from, first match wins:

1. ``$VQKV_LIBRARY``: a path to ``libvqkv.so`` (tests point it at a build).
2. The build tree of the source checkout this package sits in, when it is
   imported from there: ``build/client/libvqkv.so``.
3. ``ctypes.util.find_library("vqkv")``: the installed library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from pathlib import Path

__all__ = [
    "KEY_BYTES",
    "STATS_MAX_TENANTS",
    "LayoutStruct",
    "KVViewStruct",
    "TenantStatsStruct",
    "StatsStruct",
    "LibraryNotFoundError",
    "find_library",
    "lib",
]

KEY_BYTES = 32
STATS_MAX_TENANTS = 64

# The checkout this file sits in, when it sits in one: src/vqkv/ under
# client/python/ of the repository (an installed copy sits in none).
_CHECKOUT = Path(__file__).resolve().parents[4]
_IN_CHECKOUT = (_CHECKOUT / "client" / "python" / "src" / "vqkv" / "_native.py").is_file()
_BUILD_TREE_LIBRARY = _CHECKOUT / "build" / "client" / "libvqkv.so"


class LayoutStruct(ctypes.Structure):
    """``vqkv_layout_t``."""

    _fields_ = [
        ("num_layers", ctypes.c_uint32),
        ("num_kv_heads", ctypes.c_uint32),
        ("head_dim", ctypes.c_uint32),
        ("block_tokens", ctypes.c_uint32),
        ("dtype", ctypes.c_int),  # vqkv_dtype_t, a C enum
    ]


class KVViewStruct(ctypes.Structure):
    """``vqkv_kv_view_t``."""

    _fields_ = [
        ("region_bytes", ctypes.c_uint64),
        ("offset", ctypes.c_uint64),
        ("layer_stride", ctypes.c_uint64),
        ("kv_stride", ctypes.c_uint64),
        ("slot_stride", ctypes.c_uint64),
        ("token_stride", ctypes.c_uint64),
        ("head_stride", ctypes.c_uint64),
        ("num_slots", ctypes.c_uint32),
    ]


class TenantStatsStruct(ctypes.Structure):
    """``vqkv_tenant_stats_t``."""

    _fields_ = [
        ("tenant", ctypes.c_char * 32),
        ("hits", ctypes.c_uint64),
        ("misses", ctypes.c_uint64),
        ("blocks", ctypes.c_uint64),
        ("bytes_stored", ctypes.c_uint64),
        ("bytes_logical", ctypes.c_uint64),
        ("evictions", ctypes.c_uint64),
        ("quota_bytes", ctypes.c_uint64),
    ]


class StatsStruct(ctypes.Structure):
    """``vqkv_stats_t``."""

    _fields_ = [
        ("hits", ctypes.c_uint64),
        ("misses", ctypes.c_uint64),
        ("blocks", ctypes.c_uint64),
        ("bytes_stored", ctypes.c_uint64),
        ("bytes_logical", ctypes.c_uint64),
        ("evictions", ctypes.c_uint64),
        ("clients", ctypes.c_uint32),
        ("pool_bytes", ctypes.c_uint64),
        ("leases", ctypes.c_uint64),
        ("regions", ctypes.c_uint64),
        ("pool_slots_used", ctypes.c_uint64),
        ("pool_bytes_used", ctypes.c_uint64),
        ("n_tenants", ctypes.c_uint32),
        ("n_tenants_total", ctypes.c_uint32),
        ("tenants", TenantStatsStruct * STATS_MAX_TENANTS),
    ]


class LibraryNotFoundError(OSError):
    """libvqkv.so could not be found or loaded; the message says where it was looked for."""


_P = ctypes.c_void_p
_KEYS = ctypes.c_void_p  # uint8_t (*)[32]: a numpy array's address
_U32P = ctypes.POINTER(ctypes.c_uint32)
_SIZEP = ctypes.POINTER(ctypes.c_size_t)
_U64P = ctypes.POINTER(ctypes.c_uint64)
_INT = ctypes.c_int
_STR = ctypes.c_char_p

# name: (restype, argtypes), as in vqkv.h and vqkv_codec.h.
_SIGNATURES: dict[str, tuple[object, list[object]]] = {
    "vqkv_default_socket": (_INT, [ctypes.c_char_p, ctypes.c_size_t]),
    "vqkv_connect": (_INT, [_STR, _STR, _INT, ctypes.POINTER(_P)]),
    "vqkv_close": (None, [_P]),
    "vqkv_last_error": (_STR, [_P]),
    "vqkv_client_strerror": (_STR, [_INT]),
    "vqkv_client_tenant": (_STR, [_P]),
    "vqkv_client_backend": (_STR, [_P]),
    "vqkv_client_server_version": (_STR, [_P]),
    "vqkv_register_model": (_INT, [_P, _STR, ctypes.POINTER(LayoutStruct), _STR, ctypes.POINTER(_P)]),
    "vqkv_model_find": (_INT, [_P, _STR, ctypes.c_uint32, ctypes.c_uint32, ctypes.POINTER(_P)]),
    "vqkv_register_model_codebook": (
        _INT,
        [_P, _STR, ctypes.POINTER(LayoutStruct), _STR, _STR, ctypes.POINTER(_P)],
    ),
    "vqkv_model_codebooks_ready": (_INT, [_P]),
    "vqkv_model_codec": (_STR, [_P]),
    "vqkv_model_block_bytes": (ctypes.c_uint32, [_P]),
    "vqkv_model_layout": (None, [_P, ctypes.POINTER(LayoutStruct)]),
    "vqkv_model_block_keys": (
        _INT,
        [_P, _P, _U32P, ctypes.c_size_t, _P, ctypes.c_size_t, _KEYS, ctypes.c_size_t, _SIZEP],
    ),
    "vqkv_memfd_create": (_INT, [_STR, ctypes.c_uint64, ctypes.POINTER(_INT)]),
    "vqkv_register_memfd_region": (
        _INT,
        [_P, _P, _INT, ctypes.c_uint64, ctypes.c_uint64, ctypes.POINTER(KVViewStruct), _U64P],
    ),
    "vqkv_put": (_INT, [_P, _P, ctypes.c_uint64, _KEYS, _KEYS, _U32P, ctypes.c_size_t, _P]),
    "vqkv_lookup": (_INT, [_P, _P, _KEYS, ctypes.c_size_t, _SIZEP, _U64P]),
    "vqkv_get": (_INT, [_P, ctypes.c_uint64, ctypes.c_uint64, _U32P, ctypes.c_size_t]),
    "vqkv_release": (_INT, [_P, ctypes.c_uint64]),
    "vqkv_pin": (_INT, [_P, _P, _KEYS, ctypes.c_size_t, ctypes.c_uint32, _SIZEP]),
    "vqkv_unpin": (_INT, [_P, _P, _KEYS, ctypes.c_size_t, _SIZEP]),
    "vqkv_evict": (_INT, [_P, _P, _KEYS, ctypes.c_size_t, _INT, _SIZEP]),
    "vqkv_stats": (_INT, [_P, ctypes.POINTER(StatsStruct)]),
    # From libvqkv_kernels, which libvqkv links: dlsym on libvqkv's handle finds them.
    "vqkv_layout_check": (_INT, [ctypes.POINTER(LayoutStruct)]),
    "vqkv_kv_view_vllm": (
        None,
        [ctypes.POINTER(KVViewStruct), ctypes.POINTER(LayoutStruct), ctypes.c_uint32],
    ),
    "vqkv_kv_view_split": (
        None,
        [ctypes.POINTER(KVViewStruct), ctypes.POINTER(LayoutStruct), ctypes.c_uint32, ctypes.c_uint64],
    ),
    "vqkv_kv_view_check": (
        _INT,
        [ctypes.POINTER(LayoutStruct), ctypes.POINTER(KVViewStruct), ctypes.c_uint32],
    ),
}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None


def find_library() -> str:
    """The path or name of libvqkv that :func:`lib` loads (see the module docstring).

    Raises :class:`LibraryNotFoundError` when none of the three places has it.
    """
    env = os.environ.get("VQKV_LIBRARY")
    if env:
        return env
    if _IN_CHECKOUT and _BUILD_TREE_LIBRARY.is_file():
        return str(_BUILD_TREE_LIBRARY)
    found = ctypes.util.find_library("vqkv")
    if found is None:
        build = f", build the checkout ({_BUILD_TREE_LIBRARY} is missing)" if _IN_CHECKOUT else ""
        raise LibraryNotFoundError(f"libvqkv not found: set VQKV_LIBRARY to libvqkv.so{build} or install it")
    return found


def lib() -> ctypes.CDLL:
    """libvqkv with every function of vqkv.h declared; loaded once, on the first call.

    ctypes drops the GIL around each call, so a request blocking on the
    daemon does not stall the process's other threads.
    """
    global _lib
    with _lock:
        if _lib is None:
            path = find_library()
            try:
                loaded = ctypes.CDLL(path, use_errno=True)
            except OSError as e:
                raise LibraryNotFoundError(f"cannot load libvqkv from {path}: {e}") from e
            for name, (restype, argtypes) in _SIGNATURES.items():
                fn = getattr(loaded, name)
                fn.restype = restype
                fn.argtypes = argtypes
            _lib = loaded
        return _lib
