"""The connection to vqkvd and everything that hangs off it: models, regions, leases.

One :class:`Client` is one connection (``vqkv_client_t``). Its calls are
synchronous: each sends one request and waits for the reply (or the
client's timeout), with the GIL released meanwhile. libvqkv wants one thread
at a time on a connection; a :class:`Client` takes a lock around every call
so threads may share it (the lock costs far less than the round trip;
one client per thread still avoids waiting on each other).

The exceptions are the started calls (``vqkv_put_start``,
``vqkv_get_start``): :meth:`Client.put_start` and :meth:`Client.get_start`
send their request and return a :class:`Request` at once, and
:meth:`Client.complete` collects the finished ones as :class:`Completion`
objects, whenever the caller likes (an event loop watches
:meth:`Client.fileno`).

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
import math
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from . import _call, _native
from .errors import VqkvError, error_from_code
from .memory import KVCache, KVView, Layout

__all__ = [
    "KEY_BYTES",
    "Client",
    "Model",
    "Region",
    "Lease",
    "PutStatus",
    "PutResult",
    "Request",
    "Completion",
    "ASYNC_MAX",
    "Stats",
    "TenantStats",
    "Keys",
    "KeysLike",
    "default_socket",
]

KEY_BYTES = _native.KEY_BYTES

ASYNC_MAX = _native.ASYNC_MAX
"""Started calls and completions a client holds at most (``VQKV_ASYNC_MAX``): in flight plus
finished but not yet taken by :meth:`Client.complete`."""

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


class Request:
    """A call started by :meth:`Client.put_start` or :meth:`Client.get_start` (``vqkv_request_t``).

    Its result comes later, in a :class:`Completion` that :meth:`Client.complete`
    returns, whose ``request`` is this object. ``id`` names the call on its
    client (1, 2, ... in the order started), ``kind`` is ``"put"`` or ``"get"``
    and ``n`` the number of blocks it names; ``done`` turns true when its
    completion is taken. Until then a put's request holds the buffer libvqkv
    writes the blocks' statuses into when the replies come.
    """

    __slots__ = ("id", "kind", "n", "done", "_statuses")

    def __init__(
        self, request_id: int, kind: str, n: int, statuses: ctypes.Array[ctypes.c_int] | None = None
    ) -> None:
        """Wraps a request id; :meth:`Client.put_start` and :meth:`Client.get_start` make them."""
        self.id = request_id
        self.kind = kind
        self.n = n
        self.done = False
        self._statuses = statuses

    def __repr__(self) -> str:
        state = ", done" if self.done else ""
        return f"Request(id={self.id}, kind={self.kind!r}, n={self.n}{state})"


@dataclasses.dataclass(frozen=True)
class Completion:
    """A finished started call, as :meth:`Client.complete` takes it (``vqkv_completion_t``).

    ``result`` is what the synchronous call would have returned, the blocks
    stored (put) or written (get), or else the exception it would have raised,
    of the same class (:class:`vqkv.OutOfRangeError` for a slot outside the
    region, :class:`vqkv.ConnectionLostError` when the connection was lost
    under the call, which is never retried), as an object, not raised; its
    ``message`` names the call, since libvqkv keeps no daemon message per
    started call. ``statuses`` are a put's blocks' statuses, as
    :meth:`Client.put` returns them, when it succeeded; None for a get or a
    failed put.
    """

    request: Request
    result: int | VqkvError
    statuses: list[PutStatus] | None = None

    @property
    def ok(self) -> bool:
        """Whether the call succeeded."""
        return not isinstance(self.result, VqkvError)

    @property
    def error(self) -> VqkvError | None:
        """The call's error, None when it succeeded."""
        return self.result if isinstance(self.result, VqkvError) else None

    def check(self) -> int:
        """The blocks stored or written; raises the call's error when it failed."""
        if isinstance(self.result, VqkvError):
            raise self.result
        return self.result

    def put_result(self) -> PutResult:
        """A put's :class:`PutResult`, as :meth:`Client.put` returns it; raises the put's error if it failed.

        Raises ``TypeError`` for a get's completion.
        """
        stored = self.check()
        if self.statuses is None:
            raise TypeError(f"{self.request!r} is not a put")
        return PutResult(stored, self.statuses)


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
    staging_bytes: int
    encode_backlog: int
    puts_staged: int
    puts_staging_full: int
    disk_blocks: int
    disk_bytes: int
    disk_limit_bytes: int
    disk_writes: int
    disk_reads: int
    disk_bad_records: int
    disk_write_errors: int
    disk_dropped: int
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


def _event_handle(event: Any) -> Any:
    """A CUDA interprocess event as ``vqkv_cuda_event_t``: its ``ipc_handle()`` or the 64 bytes."""
    raw = event.ipc_handle() if hasattr(event, "ipc_handle") else event
    raw = bytes(raw)
    if len(raw) != _native.CUDA_EVENT_BYTES:
        raise _call.invalid(f"a CUDA event handle is {_native.CUDA_EVENT_BYTES} bytes, not {len(raw)}")
    return ctypes.byref(_native.CudaEventStruct.from_buffer_copy(raw))


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


def _put_arrays(
    keys: KeysLike, slots: IntsLike, parents: KeysLike | None, what: str
) -> tuple[Keys, npt.NDArray[np.uint32], Keys | None]:
    """A put's keys, slots and parents as the arrays libvqkv takes, their lengths checked."""
    k = _keys_array(keys)
    s = _u32_array(slots, "slots")
    if s.size != len(k):
        raise _call.invalid(f"{what}: {len(k)} keys but {s.size} slots")
    p = None if parents is None else _keys_array(parents, "parents")
    if p is not None and len(p) != len(k):
        raise _call.invalid(f"{what}: {len(k)} keys but {len(p)} parents")
    return k, s, p


_TIMEOUT_MS_MAX = 2**31 - 1


def _timeout_ms(timeout: float | None) -> int:
    """:meth:`Client.complete`'s timeout in seconds as vqkv_complete's milliseconds (None: -1)."""
    if timeout is None:
        return -1
    if not timeout >= 0:  # NaN too
        raise _call.invalid(f"complete: timeout must be None or at least 0 seconds, not {timeout!r}")
    ms = timeout * 1000
    return _TIMEOUT_MS_MAX if ms >= _TIMEOUT_MS_MAX else math.ceil(ms)


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

    def get(self, region: Region, slots: IntsLike, *, event: Any = None) -> int:
        """:meth:`Client.get` on this lease."""
        return self._client.get(self, region, slots, event=event)

    def get_start(self, region: Region, slots: IntsLike) -> Request:
        """:meth:`Client.get_start` on this lease: release it only once the completion is taken."""
        return self._client.get_start(self, region, slots)

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
        # Started calls whose completion is not taken yet, by id: the Request
        # a Completion hands back, and with it a put's statuses buffer, which
        # libvqkv writes into until then.
        self._requests: dict[int, Request] = {}
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

    def _start(self, request: Request, fn: str, *args: Any) -> Request:
        """Calls the start function ``fn(client, *args, &id)`` under the lock and keeps ``request``.

        It is kept under the same lock, so that no :meth:`complete` can take
        its completion before it is known.
        """
        out = ctypes.c_uint64(0)
        with self._lock:
            c = self._open_handle()
            rc: int = getattr(_native.lib(), fn)(c, *args, ctypes.byref(out))
            _call.check(rc, c, f"{request.kind}_start")
            request.id = out.value
            self._requests[request.id] = request
            return request

    # ---- models ------------------------------------------------------------------

    def register_model(
        self,
        model_id: str,
        layout: Layout,
        codec: str = "fp16",
        *,
        codebook: str | None = None,
        rope_theta: float | None = None,
        rope_style: str = "neox",
    ) -> Model:
        """Declares the model this worker serves (``vqkv_register_model_rope``).

        ``model_id`` names the weights ("org/name@revision", at most 256 bytes),
        ``layout`` its KV shape and ``codec`` the spec the daemon stores blocks
        with ("fp16", "kivi4:g=32", "rvq", ...). Workers registering the same
        id, layout and codec share blocks. ``codebook`` is a codebook file for a
        VQ codec; without one the daemon uses codebooks it saved for the model
        or calibrates online. ``rope_theta``, the model's RoPE base (10000 for
        Llama 2, 500000 for Llama 3), with ``rope_style`` ("neox" for
        rotate-half, as vLLM and Hugging Face cache keys, or "interleaved"),
        lets online calibration train codebooks that hold at later positions.

        Raises :class:`vqkv.CodecSpecError` for an unknown spec,
        :class:`vqkv.InvalidArgumentError` for a RoPE that is not one,
        :class:`vqkv.MismatchError` for an id registered with another layout,
        codec or RoPE.
        """
        st = layout.to_struct()
        rope = None
        if rope_theta is not None:
            styles = {"neox": 0, "interleaved": 1}
            if rope_style not in styles:
                raise ValueError(f"rope_style must be one of {sorted(styles)}, not {rope_style!r}")
            rope = ctypes.byref(_native.RopeStruct(rope_theta, styles[rope_style]))
        m = ctypes.c_void_p()
        self._invoke(
            f"register_model {model_id!r}",
            "vqkv_register_model_rope",
            model_id.encode(),
            ctypes.byref(st),
            codec.encode(),
            None if codebook is None else str(codebook).encode(),
            rope,
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

    def register_cuda_tensor(
        self, model: Model, tensor: Any, view: KVView | None = None, *, layout: str = "vllm"
    ) -> Region:
        """Lets the daemon read and write a KV cache in a CUDA tensor (``vqkv_register_cuda_region``).

        ``tensor`` is a PyTorch CUDA tensor (or anything with ``is_cuda``,
        ``data_ptr()``, ``numel()`` and ``element_size()``). ``view`` says
        where the blocks are in it; without one the tensor must be contiguous
        and is taken whole as ``layout``: ``"vllm"`` (``[layers][2][slots]
        [tokens][heads][dim]``) or ``"split"`` (K and V per layer,
        ``[slots][tokens][heads][dim]`` each), with as many slots as fit. The
        library finds the tensor's allocation through the CUDA driver and
        sends vqkvd an IPC handle with the tensor's offset, or for PyTorch's
        expandable segments one VMM fd for each physical allocation the
        tensor spans; the GPU is named by its UUID.

        Raises :class:`vqkv.DeviceError` when there is no CUDA driver, the
        memory is not device memory, or the daemon does not own that GPU
        (a CPU daemon); :class:`vqkv.OutOfRangeError` when the view does not
        fit in the tensor; :class:`vqkv.InvalidArgumentError` for a tensor
        that is not on a CUDA device.
        """
        if not getattr(tensor, "is_cuda", False):
            raise _call.invalid("register_cuda_tensor takes a CUDA tensor; use register_cache for host memory")
        nbytes = int(tensor.numel()) * int(tensor.element_size())
        if view is None:
            if not tensor.is_contiguous():
                raise _call.invalid("a tensor without a view must be contiguous")
            shape = model.layout
            slots = nbytes // shape.block_bytes
            if layout == "vllm":
                view = KVView.vllm(shape, slots)
            elif layout == "split":
                view = KVView.split(shape, slots)
            else:
                raise _call.invalid(f'layout {layout!r} is neither "vllm" nor "split"')
        st = view.to_struct()
        region = ctypes.c_uint64(0)
        self._invoke(
            "register_region",
            "vqkv_register_cuda_region",
            model.handle,
            int(tensor.data_ptr()),
            nbytes,
            ctypes.byref(st),
            ctypes.byref(region),
        )
        return Region(region.value, view)

    # ---- blocks ------------------------------------------------------------------

    def put(
        self,
        model: Model,
        region: Region,
        keys: KeysLike,
        slots: IntsLike,
        *,
        parents: KeysLike | None = None,
        event: Any = None,
    ) -> PutResult:
        """Offloads full blocks (``vqkv_put``): block i, in ``slots[i]`` of ``region``, under ``keys[i]``.

        Without ``parents`` the keys must be one chain from a sequence's start,
        as :meth:`Model.block_keys` computes them; otherwise ``parents[i]`` is
        the key before block i, all zero bytes for a sequence's first block.
        Do not overwrite the slots before this returns. Raises
        :class:`vqkv.OutOfRangeError` (nothing stored) for a slot outside the region.

        ``event``, for a CUDA region: a ``torch.cuda.Event(interprocess=True)``
        recorded on the stream that wrote the blocks (or its 64-byte IPC
        handle); the daemon waits on it before reading, so the stream need
        not be synchronized (``vqkv_put_after_event``).
        """
        k, s, p = _put_arrays(keys, slots, parents, "put")
        statuses = (ctypes.c_int * max(len(k), 1))()
        args = [model.handle, region.handle, _ptr(k), None if p is None else _ptr(p), _u32p(s), len(k), statuses]
        if event is None:
            stored = self._invoke("put", "vqkv_put", *args)
        else:
            stored = self._invoke("put", "vqkv_put_after_event", *args, _event_handle(event))
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

    def get(self, lease: Lease | int, region: Region, slots: IntsLike, *, event: Any = None) -> int:
        """Decompresses the lease's first ``len(slots)`` blocks into ``region``: block i into ``slots[i]``.

        Returns the number of blocks written. Raises :class:`vqkv.LeaseError`
        for an unknown or expired lease and :class:`vqkv.OutOfRangeError` for a
        slot outside the region (nothing written; the lease stays valid).

        ``event``, for a CUDA region: a ``torch.cuda.Event(interprocess=True)``
        (or its 64-byte IPC handle). The call then returns once the decode is
        queued, with the event recorded after the last write: call
        ``torch.cuda.current_stream().wait_event(event)`` before reading the
        slots (``vqkv_get_with_event``).
        """
        s = _u32_array(slots, "slots")
        lease_id = lease.id if isinstance(lease, Lease) else lease
        if event is None:
            return self._invoke("get", "vqkv_get", lease_id, region.handle, _u32p(s), s.size)
        return self._invoke(
            "get", "vqkv_get_with_event", lease_id, region.handle, _u32p(s), s.size, _event_handle(event)
        )

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
            st.staging_bytes,
            st.encode_backlog,
            st.puts_staged,
            st.puts_staging_full,
            st.disk_blocks,
            st.disk_bytes,
            st.disk_limit_bytes,
            st.disk_writes,
            st.disk_reads,
            st.disk_bad_records,
            st.disk_write_errors,
            st.disk_dropped,
            tenants,
            st.n_tenants_total,
        )

    # ---- started calls -----------------------------------------------------------

    def put_start(
        self,
        model: Model,
        region: Region,
        keys: KeysLike,
        slots: IntsLike,
        *,
        parents: KeysLike | None = None,
    ) -> Request:
        """:meth:`put`, started (``vqkv_put_start``): sends the request and returns at once.

        The arguments are :meth:`put`'s, and may be reused as soon as this
        returns (libvqkv has serialized them); the slots' memory in the cache
        must not change until the completion is taken. :meth:`complete`
        returns the :class:`Completion`: the blocks stored, or the error
        :meth:`put` would have raised, and each block's :class:`PutStatus`
        (:meth:`Completion.put_result`). Raises, with no completion to come,
        :class:`vqkv.LimitError` when the client holds :data:`ASYNC_MAX`
        started calls and completions, or as many requests in flight as the
        daemon's ``max_inflight`` less one (one stays for synchronous calls),
        :class:`vqkv.HandleError` for a region not registered on this client,
        :class:`vqkv.ConnectionLostError` when the connection breaks while
        sending. A started call is never retried: a connection lost under it
        completes it with :class:`vqkv.ConnectionLostError`.
        """
        k, s, p = _put_arrays(keys, slots, parents, "put_start")
        statuses = (ctypes.c_int * max(len(k), 1))()
        return self._start(
            Request(0, "put", len(k), statuses),
            "vqkv_put_start",
            model.handle,
            region.handle,
            _ptr(k),
            None if p is None else _ptr(p),
            _u32p(s),
            len(k),
            statuses,
        )

    def get_start(self, lease: Lease | int, region: Region, slots: IntsLike) -> Request:
        """:meth:`get`, started (``vqkv_get_start``): sends the request and returns at once.

        The blocks are in ``slots`` of ``region`` when its :class:`Completion`
        comes (:meth:`complete`; its result the number written, or the error
        :meth:`get` would have raised): do not read those slots, nor release
        the lease, before then. ``slots`` may be reused as soon as this
        returns. Raises as :meth:`put_start` does, and
        :class:`vqkv.LeaseError` for a lease taken before the client reconnected.
        """
        s = _u32_array(slots, "slots")
        lease_id = lease.id if isinstance(lease, Lease) else lease
        return self._start(
            Request(0, "get", s.size), "vqkv_get_start", lease_id, region.handle, _u32p(s), s.size
        )

    def complete(self, timeout: float | None = 0.0, max: int = 64) -> list[Completion]:
        """Takes up to ``max`` finished started calls (``vqkv_complete``), in the order they finished.

        Waits up to ``timeout`` seconds for the first one (0: not at all; None:
        as long as it takes, while any call is in flight), then takes, without
        waiting, every other one whose reply is in already; an empty list when
        none finished in time or none is in flight. Fewer than ``max`` means
        that nothing more had come: the next one makes :meth:`fileno` readable
        (``max`` of them: call again, more may be waiting). A completion's
        ``request`` is the :class:`Request` its start returned. Synchronous
        calls on the client in between read the replies of started calls as
        they come and keep them, so no completion is lost. The client's lock
        is held while this waits, so the other threads' calls on the client
        wait too.
        """
        if max < 1:
            raise _call.invalid(f"complete: max must be at least 1, not {max}")
        timeout_ms = _timeout_ms(timeout)
        done = (_native.CompletionStruct * max)()
        with self._lock:
            c = self._open_handle()
            lib = _native.lib()
            n = _call.check(lib.vqkv_complete(c, timeout_ms, done, max), c, "complete")
            # vqkv_complete returns with its first completions, and may leave
            # further replies read off the socket but not yet routed, which
            # poll() on the socket will never report: take them too, so that
            # the socket is again what says whether anything is waiting.
            while 0 < n < max:
                rest = ctypes.byref(done[n])  # done[n:], in place
                more = _call.check(lib.vqkv_complete(c, 0, rest, max - n), c, "complete")
                if more == 0:
                    break
                n += more
            return [self._completion(done[i].request, done[i].rc) for i in range(n)]

    def _completion(self, request_id: int, rc: int) -> Completion:
        """The :class:`Completion` of call ``request_id``, which ends its :class:`Request`."""
        request = self._requests.pop(request_id, None)
        if request is None:  # not started through this object: nothing to give back but its id
            request = Request(request_id, "unknown", 0)
        request.done = True
        statuses, request._statuses = request._statuses, None
        if rc < 0:
            message = f"{request.kind} started as request {request.id}"
            return Completion(request, error_from_code(rc, _call.describe(rc), message))
        if statuses is None:
            return Completion(request, rc)
        return Completion(request, rc, [PutStatus(statuses[i]) for i in range(request.n)])

    def fileno(self) -> int:
        """The connection's socket (``vqkv_client_fd``), for ``select``, ``poll`` or an event loop.

        When it is readable, call :meth:`complete` with timeout 0 (and again
        while it returns as many as its ``max``); call that also after any
        synchronous call, which may have read replies already (so a started
        call's completion may be waiting while the socket is not readable).
        -1 while disconnected; the socket changes when the client
        reconnects, so ask again after a :class:`vqkv.ConnectionLostError`.
        """
        with self._lock:
            fd: int = _native.lib().vqkv_client_fd(self._open_handle())
            return fd

    @property
    def pending(self) -> int:
        """Started calls whose completion is not taken yet, in flight or finished.

        ``vqkv_async_pending``.
        """
        with self._lock:
            n: int = _native.lib().vqkv_async_pending(self._open_handle())
            return n

    # ---- lifetime ----------------------------------------------------------------

    def close(self) -> None:
        """Closes the connection; the daemon drops its regions, leases and pins. Idempotent.

        Started calls not completed yet never complete.
        """
        with self._lock:
            if self._c:
                _native.lib().vqkv_close(self._c)
                self._c = ctypes.c_void_p()
                # libvqkv writes no more statuses: the started calls end unanswered.
                self._requests.clear()

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
