"""Layouts, KV views and worker KV memory the daemon can read and write.

A model's KV shape is a :class:`Layout`; where each element of a paged KV cache
sits in a region of memory is a :class:`KVView` of byte strides (the C
``vqkv_kv_view_t``, made by the library's own ``vqkv_kv_view_vllm`` and
``vqkv_kv_view_split`` so both languages agree on every stride).

On the CPU backend the daemon reads and writes a worker's KV cache through a
memfd the worker shares with it. :class:`KVCache` is such a cache: a memfd
(made by ``vqkv_memfd_create``, sealable as the daemon wants), mapped once, and
seen as a numpy array (:attr:`KVCache.array`) and, when torch is installed, a
CPU tensor (:meth:`KVCache.tensor`) over the same bytes, with axes
``[layer][K|V][block slot][token][kv head][dim]``: for the vLLM view that is
exactly vLLM's paged cache, one tensor for all layers. Writes through either
are what :meth:`vqkv.Client.put` sends and where :meth:`vqkv.Client.get`
lands, with no copy in between.

bf16 has no numpy dtype: a bf16 cache's array holds the raw bits as uint16
(``KVCache.tensor`` gives real ``torch.bfloat16``).
"""

from __future__ import annotations

import ctypes
import dataclasses
import enum
import mmap
import os
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from . import _native
from . import _call

if TYPE_CHECKING:
    import torch

__all__ = ["DType", "Layout", "KVView", "KVCache", "memfd_create"]


class DType(enum.IntEnum):
    """Element type of the worker's KV memory (``vqkv_dtype_t``)."""

    F16 = 0
    BF16 = 1
    F32 = 2

    @property
    def itemsize(self) -> int:
        """Bytes of one element."""
        return 4 if self is DType.F32 else 2

    @property
    def numpy_dtype(self) -> np.dtype[Any]:
        """The numpy dtype :class:`KVCache` uses: float16, float32, or uint16 bits for bf16."""
        return np.dtype({DType.F16: np.float16, DType.BF16: np.uint16, DType.F32: np.float32}[self])


@dataclasses.dataclass(frozen=True)
class Layout:
    """A model's KV shape as one worker sees it (``vqkv_layout_t``).

    Attributes:
        num_layers: transformer layers.
        num_kv_heads: KV heads (all of them: no tensor-parallel slice yet).
        head_dim: channels per head; even, at most 512.
        block_tokens: tokens per block, the engine's block size.
        dtype: element type of the KV cache.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_tokens: int
    dtype: DType = DType.F16

    def to_struct(self) -> _native.LayoutStruct:
        """The C struct; :class:`vqkv.InvalidArgumentError` when a field does not fit it."""
        fields = (self.num_layers, self.num_kv_heads, self.head_dim, self.block_tokens)
        if not all(isinstance(f, int) and 0 <= f <= 0xFFFFFFFF for f in fields):
            raise _call.invalid(f"layout fields must be u32 integers: {self}")
        return _native.LayoutStruct(*fields, int(DType(self.dtype)))

    @classmethod
    def from_struct(cls, s: _native.LayoutStruct) -> Layout:
        """The layout a C struct holds."""
        return cls(s.num_layers, s.num_kv_heads, s.head_dim, s.block_tokens, DType(s.dtype))

    def validate(self) -> None:
        """Raises :class:`vqkv.InvalidArgumentError` unless ``vqkv_layout_check`` accepts it."""
        st = self.to_struct()
        if _native.lib().vqkv_layout_check(ctypes.byref(st)) != 0:
            raise _call.invalid(f"layout refused (head_dim even and <= 512, no zero field): {self}")

    @property
    def block_values(self) -> int:
        """K and V values in one block (what one slot holds)."""
        return self.num_layers * 2 * self.block_tokens * self.num_kv_heads * self.head_dim

    @property
    def block_bytes(self) -> int:
        """Uncompressed bytes of one block in this dtype."""
        return self.block_values * DType(self.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class KVView:
    """Where a paged KV cache lives in a region of memory (``vqkv_kv_view_t``).

    Element (layer, kv, slot, token, head, dim), kv 0 for K and 1 for V, sits at byte
    ``offset + layer*layer_stride + kv*kv_stride + slot*slot_stride +
    token*token_stride + head*head_stride + dim*itemsize``. ``region_bytes``
    is the smallest region that holds the view from its offset.
    """

    region_bytes: int
    offset: int
    layer_stride: int
    kv_stride: int
    slot_stride: int
    token_stride: int
    head_stride: int
    num_slots: int

    @classmethod
    def vllm(cls, layout: Layout, num_slots: int) -> KVView:
        """vLLM's cache, all layers in one region: ``[layers][2][num_slots][tokens][heads][dim]``."""
        st = _native.KVViewStruct()
        layout.validate()
        _native.lib().vqkv_kv_view_vllm(ctypes.byref(st), ctypes.byref(layout.to_struct()), _slots(num_slots))
        return cls._from_struct(st)

    @classmethod
    def split(cls, layout: Layout, num_slots: int, gap: int = 0) -> KVView:
        """Separate K and V tensors per layer, ``[slots][tokens][heads][dim]`` each.

        Laid out K0 V0 K1 V1 ... with ``gap`` bytes of padding after every tensor.
        """
        if not 0 <= gap < 1 << 64:
            raise _call.invalid(f"gap {gap} out of range")
        st = _native.KVViewStruct()
        layout.validate()
        _native.lib().vqkv_kv_view_split(
            ctypes.byref(st), ctypes.byref(layout.to_struct()), _slots(num_slots), gap
        )
        return cls._from_struct(st)

    @classmethod
    def _from_struct(cls, st: _native.KVViewStruct) -> KVView:
        # layer_offsets is C's only: the package's views are strided.
        return cls(*(getattr(st, field.name) for field in dataclasses.fields(cls)))

    def to_struct(self) -> _native.KVViewStruct:
        """The C struct."""
        return _native.KVViewStruct(*dataclasses.astuple(self))

    def with_offset(self, offset: int) -> KVView:
        """The same view starting ``offset`` bytes into the region (region_bytes grows to match)."""
        return dataclasses.replace(self, offset=offset, region_bytes=self.region_bytes - self.offset + offset)


def _slots(num_slots: int) -> int:
    if not 0 < num_slots <= 0xFFFFFFFF:
        raise _call.invalid(f"num_slots {num_slots} out of range")
    return num_slots


def memfd_create(name: str, size: int) -> int:
    """A memfd of ``size`` bytes that the daemon accepts as a region (``vqkv_memfd_create``).

    Close-on-exec and sealable. The fd is the caller's to map and close.
    Raises :class:`vqkv.VqkvError` (``EIO``, with the OS error) when the kernel refuses.
    """
    fd = ctypes.c_int(-1)
    rc = _native.lib().vqkv_memfd_create(name.encode(), size, ctypes.byref(fd))
    _call.check_local(rc, f"memfd_create({name!r}, {size})")
    return fd.value


class KVCache:
    """A paged KV cache in a memfd, for :meth:`vqkv.Client.register_cache`.

    Make one with :meth:`create` (a new memfd sized for the view) or
    :meth:`from_fd` (an existing memfd of the worker's). The memory stays
    mapped while this object or an array or tensor over it is alive;
    :meth:`close` (or leaving a ``with`` block) closes the fd, which the daemon
    does not need once a region is registered: it maps its own copy.

    Attributes:
        layout: the model's layout.
        view: where the cache lies in the memfd.
        fd: the memfd (-1 once closed).
        size: the memfd's size in bytes.
    """

    def __init__(self, fd: int, size: int, layout: Layout, view: KVView, *, own_fd: bool) -> None:
        """Maps ``size`` bytes of ``fd`` for ``view``; use :meth:`create` or :meth:`from_fd`."""
        if view.region_bytes > size:
            raise _call.invalid(f"the view needs {view.region_bytes} bytes, the memfd has {size}")
        self.layout = layout
        self.view = view
        self.fd = fd
        self.size = size
        self._own_fd = own_fd
        self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        itemsize = DType(layout.dtype).itemsize
        self.array: npt.NDArray[Any] = np.ndarray(
            shape=(
                layout.num_layers,
                2,
                view.num_slots,
                layout.block_tokens,
                layout.num_kv_heads,
                layout.head_dim,
            ),
            dtype=DType(layout.dtype).numpy_dtype,
            buffer=self._map,
            offset=view.offset,
            strides=(
                view.layer_stride,
                view.kv_stride,
                view.slot_stride,
                view.token_stride,
                view.head_stride,
                itemsize,
            ),
        )
        """The cache as numpy: ``[layer][K|V][slot][token][head][dim]``, writable, no copy."""

    @classmethod
    def create(
        cls,
        layout: Layout,
        num_blocks: int,
        *,
        kind: Literal["vllm", "split"] = "vllm",
        gap: int = 0,
        name: str = "vqkv-kv",
    ) -> KVCache:
        """A new zeroed cache of ``num_blocks`` block slots in a memfd of its own.

        ``kind`` picks the view: ``"vllm"`` (:meth:`KVView.vllm`, one
        ``[layers][2][blocks][tokens][heads][dim]`` tensor) or ``"split"``
        (:meth:`KVView.split`, K and V per layer, ``gap`` bytes after each).
        ``name`` shows in ``/proc/PID/fd``.
        """
        if kind not in ("vllm", "split"):
            raise _call.invalid(f'kind must be "vllm" or "split", not {kind!r}')
        view = KVView.vllm(layout, num_blocks) if kind == "vllm" else KVView.split(layout, num_blocks, gap)
        fd = memfd_create(name, view.region_bytes)
        try:
            return cls(fd, view.region_bytes, layout, view, own_fd=True)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def from_fd(cls, fd: int, layout: Layout, view: KVView, *, size: int | None = None) -> KVCache:
        """A cache over an existing memfd of the caller's (kept open; the caller closes it).

        ``size`` defaults to the memfd's size. The memfd must allow sealing
        (``MFD_ALLOW_SEALING``) for the daemon to take it.
        """
        return cls(fd, os.fstat(fd).st_size if size is None else size, layout, view, own_fd=False)

    def tensor(self) -> torch.Tensor:
        """The cache as a torch CPU tensor over the same memory, same axes as :attr:`array`.

        Needs torch (imported here, not by the package). A bf16 cache comes
        out as ``torch.bfloat16``.
        """
        import torch

        if self.layout.dtype == DType.BF16:  # int16: every torch version takes it from numpy
            return torch.from_numpy(self.array.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(self.array)

    def close(self) -> None:
        """Closes the memfd when this cache made it; the mapping lives as long as its arrays."""
        if self._own_fd and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> KVCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"KVCache({self.layout}, num_slots={self.view.num_slots}, size={self.size}, fd={self.fd})"
