"""vqkv: the Python client of vqkvd, the node-local compressed KV-cache block daemon.

A thin, typed layer over libvqkv (``vqkv.h``) through ctypes: no compiled
extension, the same wire protocol and block keys as every C worker. A worker
connects (:class:`Client`), registers its model (:meth:`Client.register_model`)
and the memory of its paged KV cache (:class:`KVCache` in a memfd,
:meth:`Client.register_cache`), then offloads full blocks
(:meth:`Client.put`) and brings them back (:meth:`Client.lookup`,
:meth:`Client.get`, release), keyed by :meth:`Model.block_keys`::

    import vqkv

    layout = vqkv.Layout(num_layers=2, num_kv_heads=2, head_dim=64, block_tokens=16)
    with vqkv.Client("/run/vqkv/vqkv.sock", name="worker-0") as client:
        model = client.register_model("org/model@rev", layout, "fp16")
        cache = vqkv.KVCache.create(layout, num_blocks=64)
        region = client.register_cache(model, cache)
        keys = model.block_keys(tokens)
        client.put(model, region, keys, slots=range(len(keys)))
        with client.lookup(model, keys) as lease:
            lease.get(region, slots=free_slots[: lease.found])

Those calls are synchronous. :meth:`Client.put_start` and
:meth:`Client.get_start` send a put or a get and return a :class:`Request` at
once; :meth:`Client.complete` collects the finished ones as
:class:`Completion` objects (blocks stored or written, or the error the
synchronous call would have raised; a put's statuses), and
:meth:`Client.fileno` is the socket an event loop watches to know when.

Failures raise :class:`VqkvError` (``.code``; ``.name``, the code's C name such
as ``"VQKV_ECLOSED"``; ``.description``; ``.message``) or one of its
subclasses. A daemon that cannot be reached (:class:`DaemonUnreachableError`)
and a connection that broke (:class:`ConnectionLostError`) also raise a
``ConnectionError``. CUDA memory is registered with
:meth:`Client.register_cuda_tensor`; serving it needs vqkvd's CUDA backend,
which does not exist yet: a CPU daemon refuses it (:class:`DeviceError`).
"""

from ._native import LibraryNotFoundError, find_library
from .client import (
    ASYNC_MAX,
    KEY_BYTES,
    Client,
    Completion,
    Keys,
    KeysLike,
    Lease,
    Model,
    PutResult,
    PutStatus,
    Region,
    Request,
    Stats,
    TenantStats,
    default_socket,
)
from .errors import (
    CodecSpecError,
    ConnectionLostError,
    DaemonTimeoutError,
    DaemonUnreachableError,
    DeviceError,
    ErrorCode,
    HandleError,
    InvalidArgumentError,
    LeaseError,
    LimitError,
    MapError,
    MismatchError,
    OutOfRangeError,
    PermissionDeniedError,
    QuotaError,
    VqkvError,
    code_name,
)
from .memory import DType, KVCache, KVView, Layout, memfd_create

__version__ = "0.1.0"

__all__ = [
    "ASYNC_MAX",
    "KEY_BYTES",
    "Client",
    "CodecSpecError",
    "Completion",
    "ConnectionLostError",
    "DType",
    "DaemonTimeoutError",
    "DaemonUnreachableError",
    "DeviceError",
    "ErrorCode",
    "HandleError",
    "InvalidArgumentError",
    "KVCache",
    "KVView",
    "Keys",
    "KeysLike",
    "Layout",
    "Lease",
    "LeaseError",
    "LibraryNotFoundError",
    "LimitError",
    "MapError",
    "MismatchError",
    "Model",
    "OutOfRangeError",
    "PermissionDeniedError",
    "PutResult",
    "PutStatus",
    "QuotaError",
    "Region",
    "Request",
    "Stats",
    "TenantStats",
    "VqkvError",
    "code_name",
    "default_socket",
    "find_library",
    "memfd_create",
]
