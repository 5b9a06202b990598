"""Training data from committed shards: fast random batches, a map-style dataset, normaliser binding.

``TileBatches`` is the pretraining path: random batches gathered straight from the memory-mapped
shards by a small thread pool (numpy releases the GIL while it copies), exactly resumable from
``state_dict()`` and shardable across ``torch.distributed`` ranks. Tiles stay int16 until
``device_normalize`` turns them into float32 on the accelerator (half the bytes to transfer).
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from hsissl.data.normalize import Normalizer
from hsissl.data.shards import ShardDataset, SplitView

Batch = tuple[torch.Tensor, torch.Tensor]  # (B, C, T, T) int16, (B, T, T) uint8

_STATE_VERSION = 1


class TileBatches:
    """Random batches of one split, one epoch per ``iter()``: ``(images int16 (B,C,T,T), labels
    uint8 (B,T,T))``, pinned when CUDA is available; tiles of a batch in ascending index order.

    Every epoch draws a permutation of all tiles from one seeded ``numpy.random.Generator``
    (identical on every rank). Step ``s`` takes the global chunk ``perm[s*B*W : (s+1)*B*W]``
    (``W`` = ``world_size``) and rank ``r`` its slice ``[r*B : (r+1)*B]``, so ranks see disjoint
    tiles and together cover the epoch. With ``drop_last=False`` the short last chunk is split
    evenly, padded from the start of the permutation so every rank takes the same number of
    steps (DDP needs that); a few tiles are then seen twice.

    ``state_dict()`` records what has been *yielded* (prefetched batches are not counted), so a
    restarted trainer that loads it gets exactly the batches the uninterrupted one would have.
    Do not call ``load_state_dict`` while an iteration is in progress.
    """

    def __init__(
        self,
        split: SplitView,
        batch_size: int,
        *,
        seed: int = 0,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
        prefetch: int = 2,
        workers: int = 2,
        pin_memory: bool | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} / world_size {world_size}: need 0 <= rank < world_size")
        if prefetch < 1 or workers < 1:
            raise ValueError(f"prefetch and workers must be >= 1, got {prefetch} and {workers}")
        if len(split) == 0:
            raise ValueError(f"split {split.name!r} has no tiles")
        self.split, self.batch_size, self.seed = split, batch_size, seed
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size
        self.prefetch, self.workers = prefetch, workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        if drop_last and len(split) < self.global_batch:
            raise ValueError(f"split {split.name!r} has {len(split)} tiles, fewer than one global "
                             f"batch ({batch_size} x {world_size} ranks) with drop_last=True")  # fmt: skip
        self._buffers = HostBuffers(limit=prefetch + 3)
        self._rng = np.random.default_rng(seed)
        self.epoch, self.position = 0, 0  # position: tiles of this epoch's permutation consumed
        self._begin_epoch()

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        """Steps in a full epoch (the same on every rank)."""
        n, g = len(self.split), self.global_batch
        return n // g if self.drop_last else -(-n // g)

    def _begin_epoch(self) -> None:
        # The state *before* drawing the permutation identifies the epoch for resumption.
        self._epoch_rng_state = self._rng.bit_generator.state
        self._perm = self._rng.permutation(len(self.split))

    def _rank_indices(self, start: int) -> np.ndarray | None:
        """This rank's tile indices for the step whose global chunk starts at ``start``."""
        g = self.global_batch
        chunk = self._perm[start : start + g]
        if len(chunk) == 0 or (len(chunk) < g and self.drop_last):
            return None
        per_rank = -(-len(chunk) // self.world_size)  # equal steps on all ranks
        if per_rank * self.world_size > len(chunk):
            missing = per_rank * self.world_size - len(chunk)
            chunk = np.concatenate([chunk, np.resize(self._perm, missing)])  # wraps if tiny
        return chunk[self.rank * per_rank : (self.rank + 1) * per_rank]

    def _plan(self) -> list[tuple[np.ndarray, int]]:
        """(this rank's indices, position after the step) for the rest of the epoch."""
        steps, start = [], self.position
        while (idx := self._rank_indices(start)) is not None:
            start = min(start + self.global_batch, len(self._perm))
            steps.append((idx, start))
        return steps

    def __iter__(self) -> Iterator[Batch]:
        if not self._plan():  # the current epoch is used up: move on to the next
            self.epoch, self.position = self.epoch + 1, 0
            self._begin_epoch()
        plan = self._plan()
        pending: deque[tuple[list[Future], Batch, int]] = deque()
        with ThreadPoolExecutor(self.workers, thread_name_prefix="tiles") as pool:
            try:
                for idx, after in plan:
                    pending.append((*self._submit(pool, idx), after))
                    if len(pending) > self.prefetch:
                        yield self._take(pending)
                while pending:
                    yield self._take(pending)
            finally:  # consumer stopped early: drop what was prefetched
                for futures, _, _ in pending:
                    for f in futures:
                        f.cancel()

    def _take(self, pending: deque[tuple[list[Future], Batch, int]]) -> Batch:
        futures, batch, after = pending.popleft()
        for f in futures:
            f.result()  # re-raises a worker's exception here
        self.position = after  # counted as consumed once handed out
        return batch

    def _submit(self, pool: ThreadPoolExecutor, idx: np.ndarray) -> tuple[list[Future], Batch]:
        """Allocate the batch and fill it in ``workers`` chunks on the pool.

        The batch holds its tiles in ascending index order: then every shard's tiles form one
        contiguous run of the output, gathered straight into it (one copy, sequential reads).
        """
        idx = np.sort(idx)
        img_shape = (len(idx), *self.split.images[0].shape[1:])
        lbl_shape = (len(idx), *self.split.labels[0].shape[1:])
        if self.pin_memory:  # torch's caching host allocator recycles pinned blocks itself
            images = torch.empty(img_shape, dtype=torch.int16, pin_memory=True)
            labels = torch.empty(lbl_shape, dtype=torch.uint8, pin_memory=True)
            img_np, lbl_np = images.numpy(), labels.numpy()
        else:
            img_np, lbl_np = self._buffers.take(img_shape, lbl_shape)
            images, labels = torch.from_numpy(img_np), torch.from_numpy(lbl_np)
        bounds = np.linspace(0, len(idx), min(self.workers, len(idx)) + 1).astype(int)
        futures = [
            pool.submit(gather_into, self.split, idx[a:b], img_np[a:b], lbl_np[a:b])
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)
        ]
        return futures, (images, labels)

    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands: epoch, tiles consumed in it, generator state at its start."""
        return {
            "version": _STATE_VERSION,
            "epoch": self.epoch,
            "position": self.position,
            "rng": self._epoch_rng_state,
            "seed": self.seed,
            "tiles": len(self.split),
            "batch_size": self.batch_size,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``. A different batch size or world size continues from the same
        tile of the same permutation; a split with another tile count is refused."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"TileBatches state version {state.get('version')!r}, expected {_STATE_VERSION}"
            )
        if state["tiles"] != len(self.split):
            raise ValueError(f"TileBatches state was saved for a split of {state['tiles']} tiles; "
                             f"split {self.split.name!r} has {len(self.split)}")  # fmt: skip
        self._rng.bit_generator.state = state["rng"]
        self.epoch, self.seed = int(state["epoch"]), state["seed"]
        self._begin_epoch()
        self.position = int(state["position"])


class HostBuffers:
    """Reused (unpinned) batch buffers: a fresh 100+ MB array per batch costs a page fault per
    4 KiB (measured: 3x slower than the gather itself on a 2-core VM).

    A buffer is handed out again only when nothing else refers to it: every tensor made from it
    by ``torch.from_numpy`` (and every view of one) holds a reference to the array, so a batch the
    consumer still holds is never overwritten. At most ``limit`` buffers are kept.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._pool: list[tuple[np.ndarray, np.ndarray]] = []

    def take(self, img_shape: tuple[int, ...], lbl_shape: tuple[int, ...]
             ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        for i in range(len(self._pool)):
            # 2 = the pool's tuple + getrefcount's argument: nobody else holds the array
            free = sys.getrefcount(self._pool[i][0]) == 2 and sys.getrefcount(self._pool[i][1]) == 2
            if free and self._pool[i][0].shape == img_shape and self._pool[i][1].shape == lbl_shape:
                return self._pool[i][0], self._pool[i][1]  # a new tuple: it holds them
        pair = (np.empty(img_shape, dtype=np.int16), np.empty(lbl_shape, dtype=np.uint8))
        if len(self._pool) < self.limit:
            self._pool.append(pair)
        return pair[0], pair[1]


def endless(loader: TileBatches) -> Iterator[Batch]:
    """Batches of ``loader`` epoch after epoch, without end."""
    while True:
        yield from loader


def gather_into(split: SplitView, idx: np.ndarray, images: np.ndarray, labels: np.ndarray) -> None:
    """Copy tiles at ascending global ``idx`` of ``split`` into ``images`` (B, C, T, T) and
    ``labels`` (B, T, T), one ``np.take`` per shard straight into the output.

    Like ``SplitView.get`` minus its intermediate arrays: on a 2-core VM this is ~2.5x faster
    than ``get`` followed by a copy into a (pinned) batch buffer.
    """
    if np.any(np.diff(idx) < 0):
        raise ValueError("gather_into needs ascending indices")
    shard = np.searchsorted(split.offsets, idx, side="right") - 1
    starts = np.searchsorted(shard, np.arange(len(split.images) + 1))  # run of shard k
    for k in np.unique(shard):
        a, b = starts[k], starts[k + 1]
        local = idx[a:b] - split.offsets[k]
        np.take(split.images[k], local, axis=0, out=images[a:b])
        np.take(split.labels[k], local, axis=0, out=labels[a:b])


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Move a small CPU tensor (random parameters, masks) to ``device``; to CUDA from pinned
    memory, which does not make the host wait for the GPU (a copy from pageable memory does)."""
    if t.device.type == "cpu" and torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def device_normalize(
    batch: torch.Tensor, normalizer: Normalizer, device: torch.device | str
) -> torch.Tensor:
    """(B, C, H, W) int16 -> float32 normalised on ``device`` (convert after the transfer: half
    the bytes cross the bus, and the GPU does the arithmetic)."""
    return normalizer(batch.to(device, non_blocking=True))


def bind(dataset: ShardDataset, normalizer: Normalizer) -> Normalizer:
    """The check before finetuning/evaluation: the model's normaliser must be the dataset's.

    Raises NormalizerMismatch naming the dataset and both fingerprints; returns ``normalizer``.
    """
    normalizer.check(dataset.normalizer.fingerprint, f"dataset {dataset.uri}")
    return normalizer


class LabelledTiles(torch.utils.data.Dataset):
    """Map-style tiles for a standard DataLoader: ``(image int16 (C,T,T), label int64 (T,T))``.

    ``indices`` restricts it to a subset of the split (e.g. a labelled fraction).
    ``__getitems__`` lets the DataLoader fetch a whole batch in one sorted shard gather.
    """

    def __init__(self, split: SplitView, indices: np.ndarray | list[int] | None = None) -> None:
        self.split = split
        self.indices = (
            np.arange(len(split)) if indices is None else np.asarray(indices, dtype=np.int64)
        )

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.__getitems__([i])[0]

    def __getitems__(self, items: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        images, labels = self.split.get(self.indices[np.asarray(items, dtype=np.int64)])
        images_t = torch.from_numpy(images)  # (B, C, T, T) int16
        labels_t = torch.from_numpy(labels).long()  # (B, T, T); loss functions want int64
        return list(zip(images_t.unbind(0), labels_t.unbind(0), strict=True))
