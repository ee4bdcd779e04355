"""The connection to vqkvd and everything that hangs off it: models, regions, leases.

One :class:`Client` is one connection (``vqkv_client_t``). Its calls are
synchronous: each sends one request and waits for the reply (or the
client's timeout), with the GIL released meanwhile. libvqkv wants one thread
at a time on a connection; a :class:`Client` takes a lock around every call
so threads may share it (the lock costs far less than the round trip;
one client per thread still avoids waiting on each other).

Handles belong to their connection: closing the client (or the process
dying) releases its models, regions, leases and pins in the daemon, and the
:class:`Model` objects it made can no longer compute keys.

Keys are numpy arrays of shape ``(n, 32)``, dtype uint8 (one row per block),
as :meth:`Model.block_keys` returns them; every call taking keys also takes a
sequence of 32-byte ``bytes``. Token ids and slots are anything numpy turns
into non-negative integers below 2**32.
"""

from __future__ import annotations

import ctypes
import dataclasses
import enum
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from . import _call, _native
from .errors import VqkvError
from .memory import KVCache, KVView, Layout

__all__ = [
    "KEY_BYTES",
    "Client",
    "Model",
    "Region",
    "Lease",
    "PutStatus",
    "PutResult",
    "Stats",
    "TenantStats",
    "Keys",
    "KeysLike",
    "default_socket",
]

KEY_BYTES = _native.KEY_BYTES

Keys = npt.NDArray[np.uint8]
"""Block keys: shape ``(n, 32)``, uint8, C-contiguous."""

KeysLike = npt.NDArray[np.uint8] | Sequence[bytes]
"""What calls accept as keys: a :data:`Keys` array or 32-byte ``bytes`` objects."""

IntsLike = npt.ArrayLike | Iterable[int]


class PutStatus(enum.IntEnum):
    """What happened to one block of :meth:`Client.put` (``vqkv_put_status_t``)."""

    STORED = 0
    """compressed and stored"""
    PRESENT = 1
    """already held under this key; nothing was read"""
    NO_PARENT = 2
    """the parent key is not held: refused"""
    NO_SPACE = 3
    """the pool is full and nothing could be evicted"""
    OVER_QUOTA = 4
    """the tenant's byte quota is used up"""


@dataclasses.dataclass(frozen=True)
class PutResult:
    """The answer to :meth:`Client.put`: blocks stored, and each block's status."""

    stored: int
    statuses: list[PutStatus]


@dataclasses.dataclass(frozen=True)
class TenantStats:
    """One tenant's counters (``vqkv_tenant_stats_t``); byte counts are bytes."""

    tenant: str
    """the daemon's name for the tenant (the uid in decimal)"""
    hits: int
    misses: int
    blocks: int
    bytes_stored: int
    """compressed bytes held: what the quota limits"""
    bytes_logical: int
    """the same blocks uncompressed"""
    evictions: int
    quota_bytes: int
    """0 when unlimited"""


@dataclasses.dataclass(frozen=True)
class Stats:
    """The daemon's counters (``vqkv_stats_t``); byte counts are bytes.

    ``tenants`` holds the caller's own tenant first and, for an admin uid,
    every other tenant (at most 64 kept; ``n_tenants_total`` counts them all).
    """

    hits: int
    misses: int
    blocks: int
    bytes_stored: int
    bytes_logical: int
    evictions: int
    clients: int
    pool_bytes: int
    leases: int
    regions: int
    pool_slots_used: int
    pool_bytes_used: int
    tenants: list[TenantStats]
    n_tenants_total: int


@dataclasses.dataclass(frozen=True)
class Region:
    """A region of worker memory registered on a client (``vqkv_region_t``).

    ``handle`` is the daemon's name for it; ``view`` is how it was described,
    when it was registered through this package.
    """

    handle: int
    view: KVView | None = None


def default_socket() -> str:
    """The daemon's default socket: ``$VQKV_SOCKET`` when set; else, for a user other than root,
    ``$XDG_RUNTIME_DIR/vqkv/vqkv.sock`` when that socket exists; else ``/run/vqkv/vqkv.sock``
    (the system service's).

    Raises :class:`vqkv.InvalidArgumentError` when the path does not fit a socket address.
    """
    buf = ctypes.create_string_buffer(4096)
    _call.check_local(
        _native.lib().vqkv_default_socket(buf, len(buf)), "default socket: path too long"
    )
    return buf.value.decode()


def _u32_array(values: IntsLike, what: str) -> npt.NDArray[np.uint32]:
    """``values`` as a contiguous uint32 array, refusing anything that would wrap."""
    a = np.asarray(values if hasattr(values, "__array__") else list(values))  # type: ignore[arg-type]
    if a.ndim != 1 or not (a.size == 0 or a.dtype.kind in "iu"):
        raise _call.invalid(f"{what} must be a 1-d sequence of integers")
    if a.size and (int(a.min()) < 0 or int(a.max()) > 0xFFFFFFFF):
        raise _call.invalid(f"{what} must lie in [0, 2**32)")
    return np.ascontiguousarray(a, dtype=np.uint32)


def _keys_array(keys: KeysLike, what: str = "keys") -> Keys:
    """``keys`` as a contiguous ``(n, 32)`` uint8 array."""
    if isinstance(keys, np.ndarray):
        a = keys
    else:
        blobs = list(keys)
        if any(not isinstance(k, (bytes, bytearray, memoryview)) or len(k) != KEY_BYTES for k in blobs):
            raise _call.invalid(f"{what} must be {KEY_BYTES}-byte strings")
        a = np.frombuffer(b"".join(bytes(k) for k in blobs), dtype=np.uint8).reshape(len(blobs), KEY_BYTES)
    if a.dtype != np.uint8 or a.ndim != 2 or a.shape[1] != KEY_BYTES:
        raise _call.invalid(
            f"{what} must have shape (n, {KEY_BYTES}) and dtype uint8, not {a.shape} {a.dtype}"
        )
    return np.ascontiguousarray(a)


def _ptr(a: npt.NDArray[Any]) -> int | None:
    """The address of an array's data, None (NULL) for an empty one."""
    return a.ctypes.data if a.size else None


def _u32p(a: npt.NDArray[np.uint32]) -> Any:
    return a.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32))


class Model:
    """A model registered on a client (``vqkv_model_t``): its codec, block size and key hashing.

    Made by :meth:`Client.register_model` or :meth:`Client.find_model`; valid
    while its client is open.
    """

    def __init__(self, client: Client, handle: ctypes.c_void_p, model_id: str) -> None:
        """Wraps a libvqkv model handle; use the client's methods to make one."""
        self._client = client
        self._handle = handle
        self.model_id = model_id
        """the id it was registered or found under"""

    @property
    def handle(self) -> ctypes.c_void_p:
        """The ``vqkv_model_t *``; raises :class:`vqkv.ConnectionLostError` once the client is closed."""
        self._client._open_handle()
        return self._handle

    @property
    def codec(self) -> str:
        """The canonical codec spec the daemon answered (every parameter spelled out)."""
        spec: bytes = _native.lib().vqkv_model_codec(self.handle)
        return spec.decode()

    @property
    def block_bytes(self) -> int:
        """Stored (compressed) bytes of one block."""
        return int(_native.lib().vqkv_model_block_bytes(self.handle))

    @property
    def codebooks_ready(self) -> bool:
        """Whether the codec had its codebooks at the last registration (always for codecs without any).

        Registering the model again refreshes it: that is how a worker learns
        that the daemon's online calibration has finished.
        """
        return bool(_native.lib().vqkv_model_codebooks_ready(self.handle))

    @property
    def layout(self) -> Layout:
        """The layout: the one registered, or the daemon's for a found model."""
        st = _native.LayoutStruct()
        _native.lib().vqkv_model_layout(self.handle, ctypes.byref(st))
        return Layout.from_struct(st)

    def block_keys(
        self, tokens: IntsLike, *, parent: bytes | npt.NDArray[np.uint8] | None = None, extra: bytes = b""
    ) -> Keys:
        """The keys of the full blocks of ``tokens`` (``len(tokens) // block_tokens`` rows).

        The chained SHA-256 of client/block_keys.h under the client's tenant,
        the model id and the codec: every process that hashes the same tokens
        for the same model gets the same keys. ``parent`` is the key of the
        block just before ``tokens[0]`` (None starts a sequence); ``extra``
        goes into every key (a LoRA adapter's name, image hashes). Pure and
        safe from any thread while the client is open.
        """
        toks = _u32_array(tokens, "tokens")
        parent_key = None if parent is None else _keys_array([bytes(parent)], "parent")
        n_max = toks.size // self.layout.block_tokens
        keys = np.zeros((n_max, KEY_BYTES), dtype=np.uint8)
        n = ctypes.c_size_t(0)
        rc = _native.lib().vqkv_model_block_keys(
            self.handle,
            None if parent_key is None else _ptr(parent_key),
            _u32p(toks),
            toks.size,
            extra or None,
            len(extra),
            _ptr(keys),
            n_max,
            ctypes.byref(n),
        )
        _call.check_local(rc, "block_keys")
        return keys[: n.value]

    def __repr__(self) -> str:
        return f"Model({self.model_id!r})"


class Lease:
    """Looked-up blocks, held by the daemon until released (``vqkv_lease_t``).

    ``found`` is how many leading keys of the lookup the daemon holds; ``id``
    is 0 when none. Use it as a context manager, or call :meth:`release` as
    soon as the blocks are read: a lease keeps its blocks from eviction until
    it ends or expires.
    """

    def __init__(self, client: Client, lease_id: int, found: int) -> None:
        """Wraps a lease id; :meth:`Client.lookup` makes them."""
        self._client = client
        self.id = lease_id
        self.found = found

    def get(self, region: Region, slots: IntsLike) -> int:
        """:meth:`Client.get` on this lease."""
        return self._client.get(self, region, slots)

    def release(self) -> None:
        """Ends the lease; later calls do nothing. See :meth:`Client.release`."""
        if self.id != 0 and not self._client.closed:
            self._client.release(self)
        self.id = 0

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"Lease(id={self.id}, found={self.found})"


class Client:
    """A connection to vqkvd (``vqkv_connect``), closed by :meth:`close` or a ``with`` block.

    Args:
        socket_path: the daemon's socket; None for :func:`default_socket`.
        name: shows in the daemon's logs (at most 64 bytes); None for "libvqkv".
        timeout_ms: how long every call waits for its reply before it raises
            :class:`vqkv.DaemonTimeoutError`.

    Raises :class:`vqkv.DaemonUnreachableError` (a ``ConnectionError``) when
    the daemon cannot be reached, :class:`vqkv.VqkvError` when it refuses the
    session (``EPERM``, ``EVERSION``).
    """

    def __init__(
        self, socket_path: str | None = None, name: str | None = None, timeout_ms: int = 5000
    ) -> None:
        """Connects and opens the session (Hello, Welcome)."""
        self._lock = threading.Lock()
        self._c = ctypes.c_void_p()
        lib = _native.lib()
        rc = lib.vqkv_connect(
            None if socket_path is None else socket_path.encode(),
            None if name is None else name.encode(),
            timeout_ms,
            ctypes.byref(self._c),
        )
        if rc < 0:
            try:
                where = socket_path or default_socket()
            except VqkvError:
                where = "the default socket (path too long)"
            _call.check_local(rc, f"connect to {where}", connecting=True)
        self.tenant: str = lib.vqkv_client_tenant(self._c).decode()
        """the daemon's tenant name for this peer (the uid in decimal, or a configured name)"""
        self.backend: str = lib.vqkv_client_backend(self._c).decode()
        """the daemon's backend: "cpu" or "cuda" """
        self.server_version: str = lib.vqkv_client_server_version(self._c).decode()
        """the daemon's version"""

    # ---- plumbing ----------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return not self._c

    def _open_handle(self) -> ctypes.c_void_p:
        if not self._c:
            raise _call.error_closed()
        return self._c

    def _invoke(self, what: str, fn: str, *args: Any) -> int:
        """Calls ``fn(client, *args)`` under the lock and checks its code."""
        with self._lock:
            c = self._open_handle()
            rc: int = getattr(_native.lib(), fn)(c, *args)
            return _call.check(rc, c, what)

    # ---- models ------------------------------------------------------------------

    def register_model(
        self, model_id: str, layout: Layout, codec: str = "fp16", *, codebook: str | None = None
    ) -> Model:
        """Declares the model this worker serves (``vqkv_register_model``).

        ``model_id`` names the weights ("org/name@revision", at most 256 bytes),
        ``layout`` its KV shape and ``codec`` the spec the daemon stores blocks
        with ("fp16", "kivi4:g=32", "rvq", ...). Workers registering the same
        id, layout and codec share blocks. ``codebook`` is a codebook file for a
        VQ codec (``vqkv_register_model_codebook``); without one the daemon uses
        codebooks it saved for the model or calibrates online.

        Raises :class:`vqkv.CodecSpecError` for an unknown spec,
        :class:`vqkv.MismatchError` for an id registered with another layout or codec.
        """
        st = layout.to_struct()
        m = ctypes.c_void_p()
        if codebook is None:
            self._invoke(
                f"register_model {model_id!r}",
                "vqkv_register_model",
                model_id.encode(),
                ctypes.byref(st),
                codec.encode(),
                ctypes.byref(m),
            )
        else:
            self._invoke(
                f"register_model {model_id!r}",
                "vqkv_register_model_codebook",
                model_id.encode(),
                ctypes.byref(st),
                codec.encode(),
                str(codebook).encode(),
                ctypes.byref(m),
            )
        return Model(self, m, model_id)

    def find_model(self, model_id: str, kv_head_first: int = 0, kv_head_count: int = 0) -> Model:
        """Opens a model the tenant registered already, layout and codec included (``vqkv_model_find``).

        ``kv_head_count`` 0 takes the head range starting at ``kv_head_first``
        that was registered first. Raises :class:`vqkv.HandleError` when the
        tenant has no such model.
        """
        m = ctypes.c_void_p()
        self._invoke(
            f"find_model {model_id!r}",
            "vqkv_model_find",
            model_id.encode(),
            kv_head_first,
            kv_head_count,
            ctypes.byref(m),
        )
        return Model(self, m, model_id)

    # ---- regions -----------------------------------------------------------------

    def register_memfd(
        self, model: Model, memfd: int, size: int, view: KVView, offset: int | None = None
    ) -> Region:
        """Lets the daemon read and write a KV cache in a memfd (``vqkv_register_memfd_region``).

        ``size`` is the memfd's size, ``view`` the cache's strides and slots,
        ``offset`` where the view starts in the memfd (None: ``view.offset``).
        The fd stays the caller's: the daemon maps its own copy. Raises
        :class:`vqkv.OutOfRangeError` when the view does not fit in ``size``,
        :class:`vqkv.MapError` when the memfd cannot be sealed or mapped.
        """
        off = view.offset if offset is None else offset
        st = view.to_struct()
        region = ctypes.c_uint64(0)
        self._invoke(
            "register_region",
            "vqkv_register_memfd_region",
            model.handle,
            memfd,
            size,
            off,
            ctypes.byref(st),
            ctypes.byref(region),
        )
        return Region(region.value, view.with_offset(off))

    def register_cache(self, model: Model, cache: KVCache) -> Region:
        """:meth:`register_memfd` for a :class:`vqkv.KVCache` (its memfd, size and view)."""
        if cache.fd < 0:
            raise _call.invalid("the cache's memfd is closed")
        return self.register_memfd(model, cache.fd, cache.size, cache.view)

    def register_cuda_tensor(self, model: Model, tensor: Any, view: KVView) -> Region:
        """Registering CUDA memory (CUDA IPC handles, VMM fds) needs vqkvd's CUDA backend.

        That backend does not exist yet, so this always raises
        ``NotImplementedError``. On the CPU backend, keep the KV cache in a
        :class:`vqkv.KVCache` (a memfd) and register it with :meth:`register_cache`.
        """
        raise NotImplementedError(
            "CUDA regions need vqkvd's CUDA backend, which this version does not have; "
            "use a memfd-backed vqkv.KVCache and Client.register_cache on the CPU backend"
        )

    # ---- blocks ------------------------------------------------------------------

    def put(
        self,
        model: Model,
        region: Region,
        keys: KeysLike,
        slots: IntsLike,
        *,
        parents: KeysLike | None = None,
    ) -> PutResult:
        """Offloads full blocks (``vqkv_put``): block i, in ``slots[i]`` of ``region``, under ``keys[i]``.

        Without ``parents`` the keys must be one chain from a sequence's start,
        as :meth:`Model.block_keys` computes them; otherwise ``parents[i]`` is
        the key before block i, all zero bytes for a sequence's first block.
        Do not overwrite the slots before this returns. Raises
        :class:`vqkv.OutOfRangeError` (nothing stored) for a slot outside the region.
        """
        k = _keys_array(keys)
        s = _u32_array(slots, "slots")
        if s.size != len(k):
            raise _call.invalid(f"put: {len(k)} keys but {s.size} slots")
        p = None if parents is None else _keys_array(parents, "parents")
        if p is not None and len(p) != len(k):
            raise _call.invalid(f"put: {len(k)} keys but {len(p)} parents")
        statuses = (ctypes.c_int * max(len(k), 1))()
        stored = self._invoke(
            "put",
            "vqkv_put",
            model.handle,
            region.handle,
            _ptr(k),
            None if p is None else _ptr(p),
            _u32p(s),
            len(k),
            statuses,
        )
        return PutResult(stored, [PutStatus(statuses[i]) for i in range(len(k))])

    def lookup(self, model: Model, keys: KeysLike) -> Lease:
        """Finds how many leading keys of the chain the daemon holds and leases them (``vqkv_lookup``).

        The returned :class:`Lease` keeps those blocks from eviction until it
        is released (use it in a ``with`` block) or expires.
        """
        k = _keys_array(keys)
        found = ctypes.c_size_t(0)
        lease = ctypes.c_uint64(0)
        self._invoke(
            "lookup", "vqkv_lookup", model.handle, _ptr(k), len(k), ctypes.byref(found), ctypes.byref(lease)
        )
        return Lease(self, lease.value, found.value)

    def get(self, lease: Lease | int, region: Region, slots: IntsLike) -> int:
        """Decompresses the lease's first ``len(slots)`` blocks into ``region``: block i into ``slots[i]``.

        Returns the number of blocks written. Raises :class:`vqkv.LeaseError`
        for an unknown or expired lease and :class:`vqkv.OutOfRangeError` for a
        slot outside the region (nothing written; the lease stays valid).
        """
        s = _u32_array(slots, "slots")
        lease_id = lease.id if isinstance(lease, Lease) else lease
        return self._invoke("get", "vqkv_get", lease_id, region.handle, _u32p(s), s.size)

    def release(self, lease: Lease | int) -> None:
        """Ends a lease (``vqkv_release``); 0 does nothing.

        Raises :class:`vqkv.LeaseError` for an unknown or expired one.
        """
        lease_id = lease.id if isinstance(lease, Lease) else lease
        self._invoke("release", "vqkv_release", lease_id)
        if isinstance(lease, Lease):
            lease.id = 0

    def pin(self, model: Model, keys: KeysLike, ttl_ms: int = 0) -> int:
        """Keeps blocks from eviction (``vqkv_pin``): ``ttl_ms`` ms, or with 0 until :meth:`unpin` or close.

        Keys the daemon does not hold are skipped; returns how many blocks
        were pinned. At most 65536 keys a call.
        """
        k = _keys_array(keys)
        count = ctypes.c_size_t(0)
        self._invoke("pin", "vqkv_pin", model.handle, _ptr(k), len(k), ttl_ms, ctypes.byref(count))
        return count.value

    def unpin(self, model: Model, keys: KeysLike) -> int:
        """Ends the pins of these blocks, whoever of the tenant pinned them (``vqkv_unpin``).

        Returns how many blocks were unpinned.
        """
        k = _keys_array(keys)
        count = ctypes.c_size_t(0)
        self._invoke("unpin", "vqkv_unpin", model.handle, _ptr(k), len(k), ctypes.byref(count))
        return count.value

    def evict(self, model: Model, keys: KeysLike | None = None, *, all: bool = False) -> int:
        """Removes blocks now, each with its descendants; returns how many went (``vqkv_evict``).

        Pass ``keys``, or ``all=True`` for every block of the model. A block
        whose subtree holds a leased or pinned block is skipped whole.
        """
        if (keys is None) == (not all):
            raise _call.invalid("evict: pass keys or all=True, not both")
        k = np.zeros((0, KEY_BYTES), np.uint8) if keys is None else _keys_array(keys)
        count = ctypes.c_size_t(0)
        self._invoke("evict", "vqkv_evict", model.handle, _ptr(k), len(k), int(all), ctypes.byref(count))
        return count.value

    def stats(self) -> Stats:
        """The daemon's counters, with per-tenant entries (``vqkv_stats``)."""
        st = _native.StatsStruct()
        self._invoke("stats", "vqkv_stats", ctypes.byref(st))
        tenants = [
            TenantStats(
                t.tenant.decode(errors="replace"),
                t.hits,
                t.misses,
                t.blocks,
                t.bytes_stored,
                t.bytes_logical,
                t.evictions,
                t.quota_bytes,
            )
            for t in st.tenants[: st.n_tenants]
        ]
        return Stats(
            st.hits,
            st.misses,
            st.blocks,
            st.bytes_stored,
            st.bytes_logical,
            st.evictions,
            st.clients,
            st.pool_bytes,
            st.leases,
            st.regions,
            st.pool_slots_used,
            st.pool_bytes_used,
            tenants,
            st.n_tenants_total,
        )

    # ---- lifetime ----------------------------------------------------------------

    def close(self) -> None:
        """Closes the connection; the daemon drops its regions, leases and pins. Idempotent."""
        with self._lock:
            if self._c:
                _native.lib().vqkv_close(self._c)
                self._c = ctypes.c_void_p()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_c", None):
            self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"tenant={self.tenant!r}, backend={self.backend!r}"
        return f"Client({state})"
