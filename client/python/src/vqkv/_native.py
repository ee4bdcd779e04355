"""The ctypes face of libvqkv: finding the shared library and declaring its functions.

Everything here mirrors ``vqkv.h`` and ``vqkv_codec.h`` one to one; the rest of
the package builds the Python API on top and is the only user of this module.
The library is loaded on first use, not at import, so ``import vqkv`` works
(for type checkers, documentation, a process that only builds layouts)
on a machine without it.

Where the library comes from, first match wins:

1. ``$VQKV_LIBRARY``: a path to ``libvqkv.so`` (tests point it at a build),
   taken as it is.
2. ``libvqkv.so.0`` or ``libvqkv.so`` in the libdir of
   ``pkg-config --variable=libdir libvqkv``, when pkg-config is installed and
   finds ``libvqkv.pc`` (``cmake --install`` puts it in ``lib*/pkgconfig``;
   ``$PKG_CONFIG_PATH`` adds a custom prefix's).
3. ``ctypes.util.find_library("vqkv")``: what the dynamic linker's cache knows.
4. ``libvqkv.so.0`` or ``libvqkv.so`` in the usual install libdirs, for an
   install that ``ldconfig`` has not seen: ``/usr/local/lib``,
   ``/usr/local/lib/<triplet>``, ``/usr/lib/<triplet>``, ``/usr/lib``
   (``<triplet>`` is Python's multiarch tuple, such as ``x86_64-linux-gnu``).
5. The build trees of the source checkout this package sits in, when it is
   imported from there: ``build/client/libvqkv.so``, then
   ``build-release/client/libvqkv.so``.

:class:`LibraryNotFoundError` lists every place looked in when none has it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import subprocess
import sysconfig
import threading
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "KEY_BYTES",
    "STATS_MAX_TENANTS",
    "ASYNC_MAX",
    "LayoutStruct",
    "KVViewStruct",
    "TenantStatsStruct",
    "StatsStruct",
    "CompletionStruct",
    "LibraryNotFoundError",
    "find_library",
    "lib",
]

KEY_BYTES = 32
STATS_MAX_TENANTS = 64
ASYNC_MAX = 256  # VQKV_ASYNC_MAX

# The checkout this file sits in, when it sits in one: src/vqkv/ under
# client/python/ of the repository (an installed copy sits in none).
_CHECKOUT = Path(__file__).resolve().parents[4]
_IN_CHECKOUT = (_CHECKOUT / "client" / "python" / "src" / "vqkv" / "_native.py").is_file()
# The default and release presets' trees; not build-asan's, whose library
# loads only with the ASan runtime preloaded (tests/run.sh does that).
_CHECKOUT_LIBRARIES = (
    [_CHECKOUT / tree / "client" / "libvqkv.so" for tree in ("build", "build-release")]
    if _IN_CHECKOUT
    else []
)

# The soname first: the unversioned link only comes with a development install.
_NAMES = ("libvqkv.so.0", "libvqkv.so")
# Where cmake --install puts the library under the /usr/local and /usr
# prefixes, GNUInstallDirs' libdir being lib or lib/<triplet>.
_TRIPLET = sysconfig.get_config_var("MULTIARCH") or f"{platform.machine()}-linux-gnu"
_SYSTEM_LIBDIRS = [
    Path("/usr/local/lib"),
    Path("/usr/local/lib", _TRIPLET),
    Path("/usr/lib", _TRIPLET),
    Path("/usr/lib"),
]


class LayoutStruct(ctypes.Structure):
    """``vqkv_layout_t``."""

    _fields_ = [
        ("num_layers", ctypes.c_uint32),
        ("num_kv_heads", ctypes.c_uint32),
        ("head_dim", ctypes.c_uint32),
        ("block_tokens", ctypes.c_uint32),
        ("dtype", ctypes.c_int),  # vqkv_dtype_t, a C enum
    ]


class RopeStruct(ctypes.Structure):
    """``vqkv_rope_t``."""

    _fields_ = [
        ("theta", ctypes.c_double),
        ("style", ctypes.c_int),  # vqkv_rope_style_t, a C enum
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
        # const uint64_t *: per-layer starts; None for a strided view
        ("layer_offsets", ctypes.c_void_p),
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
        ("staging_bytes", ctypes.c_uint64),
        ("encode_backlog", ctypes.c_uint64),
        ("puts_staged", ctypes.c_uint64),
        ("puts_staging_full", ctypes.c_uint64),
        ("disk_blocks", ctypes.c_uint64),
        ("disk_bytes", ctypes.c_uint64),
        ("disk_limit_bytes", ctypes.c_uint64),
        ("disk_writes", ctypes.c_uint64),
        ("disk_reads", ctypes.c_uint64),
        ("disk_bad_records", ctypes.c_uint64),
        ("disk_write_errors", ctypes.c_uint64),
        ("disk_dropped", ctypes.c_uint64),
        ("n_tenants", ctypes.c_uint32),
        ("n_tenants_total", ctypes.c_uint32),
        ("tenants", TenantStatsStruct * STATS_MAX_TENANTS),
    ]


class CompletionStruct(ctypes.Structure):
    """``vqkv_completion_t``."""

    _fields_ = [
        ("request", ctypes.c_uint64),  # vqkv_request_t
        ("rc", ctypes.c_int),
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

CUDA_EVENT_BYTES = 64


class CudaEventStruct(ctypes.Structure):
    """``vqkv_cuda_event_t``: a cudaIpcEventHandle_t's bytes."""

    _fields_ = [("bytes", ctypes.c_uint8 * CUDA_EVENT_BYTES)]


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
    "vqkv_register_model_rope": (
        _INT,
        [_P, _STR, ctypes.POINTER(LayoutStruct), _STR, _STR, ctypes.POINTER(RopeStruct), ctypes.POINTER(_P)],
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
    "vqkv_register_cuda_region": (
        _INT,
        [_P, _P, ctypes.c_uint64, ctypes.c_uint64, ctypes.POINTER(KVViewStruct), _U64P],
    ),
    "vqkv_put": (_INT, [_P, _P, ctypes.c_uint64, _KEYS, _KEYS, _U32P, ctypes.c_size_t, _P]),
    "vqkv_put_after_event": (
        _INT,
        [_P, _P, ctypes.c_uint64, _KEYS, _KEYS, _U32P, ctypes.c_size_t, _P, ctypes.POINTER(CudaEventStruct)],
    ),
    "vqkv_get_with_event": (
        _INT,
        [_P, ctypes.c_uint64, ctypes.c_uint64, _U32P, ctypes.c_size_t, ctypes.POINTER(CudaEventStruct)],
    ),
    "vqkv_lookup": (_INT, [_P, _P, _KEYS, ctypes.c_size_t, _SIZEP, _U64P]),
    "vqkv_get": (_INT, [_P, ctypes.c_uint64, ctypes.c_uint64, _U32P, ctypes.c_size_t]),
    "vqkv_release": (_INT, [_P, ctypes.c_uint64]),
    "vqkv_pin": (_INT, [_P, _P, _KEYS, ctypes.c_size_t, ctypes.c_uint32, _SIZEP]),
    "vqkv_unpin": (_INT, [_P, _P, _KEYS, ctypes.c_size_t, _SIZEP]),
    "vqkv_evict": (_INT, [_P, _P, _KEYS, ctypes.c_size_t, _INT, _SIZEP]),
    "vqkv_stats": (_INT, [_P, ctypes.POINTER(StatsStruct)]),
    "vqkv_put_start": (
        _INT,
        [_P, _P, ctypes.c_uint64, _KEYS, _KEYS, _U32P, ctypes.c_size_t, _P, _U64P],
    ),
    "vqkv_get_start": (_INT, [_P, ctypes.c_uint64, ctypes.c_uint64, _U32P, ctypes.c_size_t, _U64P]),
    "vqkv_complete": (_INT, [_P, _INT, ctypes.POINTER(CompletionStruct), ctypes.c_size_t]),
    "vqkv_client_fd": (_INT, [_P]),
    "vqkv_async_pending": (ctypes.c_size_t, [_P]),
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


def _pkg_config_libdir() -> tuple[Path | None, str]:
    """libvqkv.pc's libdir, or None and why there is none."""
    try:
        out = subprocess.run(
            ["pkg-config", "--variable=libdir", "libvqkv"], capture_output=True, text=True, check=False
        )
    except OSError as e:
        return None, f"pkg-config cannot run: {e}"
    libdir = out.stdout.strip()
    if out.returncode != 0 or not libdir:
        path = os.environ.get("PKG_CONFIG_PATH", "")
        return None, f"no libvqkv.pc on pkg-config's path (PKG_CONFIG_PATH={path!r})"
    # resolve(): the .pc is relocatable, so its libdir reads PREFIX/lib/pkgconfig/../../lib.
    return Path(libdir).resolve(), ""


def _files_in(libdir: Path) -> Iterator[tuple[str, str | None]]:
    """libdir's places for :func:`_places`, the soname first."""
    for name in _NAMES:
        path = libdir / name
        yield str(path), str(path) if path.is_file() else None


def _places() -> Iterator[tuple[str, str | None]]:
    """Every place after $VQKV_LIBRARY, in order: how to name it, and the library it has or None.

    A generator, so that nothing past the first hit runs (pkg-config and
    find_library start processes).
    """
    libdir, why = _pkg_config_libdir()
    if libdir is None:
        yield f"pkg-config --variable=libdir libvqkv: {why}", None
    else:
        yield from _files_in(libdir)
    found = ctypes.util.find_library("vqkv")
    yield 'ctypes.util.find_library("vqkv"): not in ld.so\'s cache or LD_LIBRARY_PATH', found
    for system in _SYSTEM_LIBDIRS:
        yield from _files_in(system)
    for build in _CHECKOUT_LIBRARIES:
        yield str(build), str(build) if build.is_file() else None


def find_library() -> str:
    """The path or name of libvqkv that :func:`lib` loads (see the module docstring for the order).

    Raises :class:`LibraryNotFoundError`, listing every place looked in, when none has it.
    """
    env = os.environ.get("VQKV_LIBRARY")
    if env:
        return env
    looked = ["$VQKV_LIBRARY: not set"]
    for place, found in _places():
        if found:
            return found
        looked.append(place)
    raise LibraryNotFoundError(
        "libvqkv not found; looked in:\n"
        + "".join(f"  {place}\n" for place in looked)
        + "Install it (cmake --install BUILD_DIR, with --prefix DIR and DIR/lib/pkgconfig on"
        " PKG_CONFIG_PATH for a custom prefix) or set VQKV_LIBRARY to the path of libvqkv.so."
    )


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
