"""A second worker process for the tests: restores a prompt's blocks from the daemon.

Run through multiprocessing's spawn start method, so it is a fresh
interpreter with a connection, a model registration and a KV cache of its own,
as another engine process on the node would be.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

import vqkv


@dataclasses.dataclass(frozen=True)
class Restored:
    """What the worker saw: the lookup's result, what get wrote, the blocks in prompt order."""

    found: int
    written: int
    blocks: npt.NDArray[Any]  # [block][layer][K|V][token][head][dim]
    hits: int


def restore(
    socket: str,
    model_id: str,
    layout: vqkv.Layout,
    codec: str,
    tokens: list[int],
    num_blocks: int,
    kind: Literal["vllm", "split"],
) -> Restored:
    """Looks up ``tokens``' blocks and gets them into the last slots of its own cache, in reverse."""
    with (
        vqkv.Client(socket, name="second-worker", timeout_ms=30000) as client,
        vqkv.KVCache.create(layout, num_blocks, kind=kind, gap=64) as cache,
    ):
        model = client.register_model(model_id, layout, codec)
        region = client.register_cache(model, cache)
        keys = model.block_keys(tokens)
        with client.lookup(model, keys) as lease:
            slots = np.arange(num_blocks - 1, num_blocks - 1 - lease.found, -1)
            written = lease.get(region, slots)
        blocks = (
            np.stack([cache.array[:, :, s] for s in slots])
            if len(slots)
            else np.empty((0, *cache.array[:, :, 0].shape), cache.array.dtype)
        )
        return Restored(lease.found, written, blocks, client.stats().tenants[0].hits)
