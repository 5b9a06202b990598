"""TileBatches (determinism, exact resume, epochs, DDP sharding), LabelledTiles, bind."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from hsissl.data.loaders import HostBuffers, LabelledTiles, TileBatches, bind, device_normalize
from hsissl.data.normalize import Normalizer, NormalizerMismatch
from hsissl.data.shards import ShardDataset, SplitView

BANDS, TILE = 32, 4


def make_split(n: int, shard: int = 7) -> SplitView:
    """In-memory shards whose tile ``i`` is filled with ``i`` (labels: ``i % 256``)."""
    ids = np.arange(n)
    images = [np.broadcast_to(ids[a : a + shard, None, None, None], (len(ids[a : a + shard]), BANDS, TILE, TILE)).astype(np.int16)
              for a in range(0, n, shard)]  # fmt: skip
    labels = [(img[:, 0] % 256).astype(np.uint8) for img in images]
    sources = np.zeros((n, 3), np.int32)
    return SplitView("tr", images, labels, sources, ["S0"])


def ids_of(batch: tuple[torch.Tensor, torch.Tensor]) -> list[int]:
    images, labels = batch
    assert images.dtype == torch.int16 and labels.dtype == torch.uint8
    assert images.shape[1:] == (BANDS, TILE, TILE) and labels.shape[1:] == (TILE, TILE)
    ids = images[:, 0, 0, 0].tolist()
    assert torch.equal(images, images[:, :1, :1, :1].expand_as(images))  # whole tile gathered
    assert labels[:, 0, 0].tolist() == [i % 256 for i in ids]  # labels travel with their tile
    return ids


def epoch_ids(loader: TileBatches) -> list[list[int]]:
    return [ids_of(b) for b in loader]


def test_same_seed_same_batches_and_thread_count_does_not_matter():
    split = make_split(103)
    a = TileBatches(split, 10, seed=5, workers=1, prefetch=1)
    b = TileBatches(split, 10, seed=5, workers=3, prefetch=3)
    c = TileBatches(split, 10, seed=6)
    first = [epoch_ids(a), epoch_ids(a)]
    assert first == [epoch_ids(b), epoch_ids(b)]
    assert first[0] != first[1]  # a fresh permutation each epoch
    assert epoch_ids(c) != first[0]


def test_an_epoch_covers_every_tile_once():
    split = make_split(103)
    full = epoch_ids(TileBatches(split, 10, drop_last=False))
    assert [len(b) for b in full] == [10] * 10 + [3]
    assert sorted(sum(full, [])) == list(range(103))
    dropped = TileBatches(split, 10, drop_last=True)
    batches = epoch_ids(dropped)
    assert len(batches) == len(dropped) == 10 and all(len(b) == 10 for b in batches)
    assert len(set(sum(batches, []))) == 100


def test_resume_yields_exactly_the_batches_of_the_uninterrupted_run():
    split = make_split(103)
    reference = TileBatches(split, 8, seed=1)
    expected = epoch_ids(reference) + epoch_ids(reference)  # two epochs, 12 steps each

    for k in (0, 3, 12, 15):  # before start, mid-epoch, at an epoch boundary, mid epoch 2
        run = TileBatches(split, 8, seed=1, prefetch=3)
        seen: list[list[int]] = []
        while len(seen) < k:  # break out mid-iteration: prefetched batches must not count
            for batch in run:
                seen.append(ids_of(batch))
                if len(seen) == k or len(seen) == 12:
                    break
        buffer = io.BytesIO()
        torch.save(run.state_dict(), buffer)  # a checkpoint round trip
        buffer.seek(0)
        restarted = TileBatches(split, 8, seed=999)  # the state, not the seed, decides
        restarted.load_state_dict(torch.load(buffer, weights_only=True))
        rest: list[list[int]] = []
        while len(seen) + len(rest) < 24:
            rest += epoch_ids(restarted)
        assert seen + rest == expected, f"resume after {k} batches diverged"
        assert restarted.epoch == 1


def test_state_of_another_split_is_refused():
    state = TileBatches(make_split(103), 8).state_dict()
    with pytest.raises(ValueError, match="split of 103 tiles; split 'tr' has 50"):
        TileBatches(make_split(50), 8).load_state_dict(state)


@pytest.mark.parametrize("drop_last", [True, False])
def test_ddp_ranks_take_disjoint_slices_that_cover_the_epoch(drop_last):
    split, world = make_split(50), 3
    ranks = [TileBatches(split, 4, seed=2, rank=r, world_size=world, drop_last=drop_last)
             for r in range(world)]  # fmt: skip
    for _ in range(2):  # epochs
        per_rank = [epoch_ids(loader) for loader in ranks]
        steps = {len(batches) for batches in per_rank}
        assert steps == {len(ranks[0])}  # every rank takes the same number of steps (DDP)
        for step in zip(*per_rank, strict=True):
            flat = sum(step, [])
            assert len(set(flat)) == len(flat)  # disjoint within a step
        tiles = [i for batches in per_rank for b in batches for i in b]
        if drop_last:
            assert len(tiles) == len(set(tiles)) == 48  # 4 steps x 4 tiles x 3 ranks
        else:
            # 4 full steps, then the last 2 tiles split 1 per rank + 1 repeated from the start
            assert [len(b) for b in per_rank[0]] == [4, 4, 4, 4, 1]
            assert set(tiles) == set(range(50)) and len(tiles) == 51


def test_ranks_slice_the_single_process_stream():
    split = make_split(50)
    single = epoch_ids(TileBatches(split, 12, seed=3))
    ranks = [epoch_ids(TileBatches(split, 4, seed=3, rank=r, world_size=3)) for r in range(3)]
    assert [sorted(sum(step, [])) for step in zip(*ranks, strict=True)] == [
        sorted(b) for b in single
    ]


def test_reused_buffers_never_overwrite_a_batch_still_held():
    split = make_split(200)
    loader = TileBatches(split, 10, seed=4, prefetch=2, workers=2, pin_memory=False)
    held = []  # keep every 5th batch (and a view of another) alive while the loader runs on
    for step, (images, labels) in enumerate(loader):
        if step % 5 == 0:
            held.append((images, labels, images.clone()))
        if step == 3:
            view, expected = images[:, :2], images[:, :2].clone()
    for images, _, copy in held + [(view, None, expected)]:
        assert torch.equal(images, copy)
    assert len(held) == 4


def test_host_buffers_are_recycled_only_when_released():
    pool = HostBuffers(limit=2)
    a = pool.take((2, 3), (2,))
    a_id = id(a[0])
    b = pool.take((2, 3), (2,))
    assert id(b[0]) != a_id  # a is still held
    del a
    c = pool.take((2, 3), (2,))
    assert id(c[0]) == a_id  # recycled
    tensor_view = torch.from_numpy(c[1])[1:]  # a view of a tensor made from it pins it too
    del c
    assert id(pool.take((2, 3), (2,))[0]) != a_id
    del tensor_view
    assert id(pool.take((2, 3), (2,))[0]) == a_id
    assert pool.take((4, 3), (4,))[0].shape == (4, 3)  # other shapes get their own arrays


def test_labelled_tiles_with_a_standard_dataloader():
    split = make_split(30)
    data = LabelledTiles(split, indices=[5, 6, 7, 20, 29])
    assert len(data) == 5
    image, label = data[3]
    assert image.dtype == torch.int16 and image.shape == (BANDS, TILE, TILE)
    assert image[0, 0, 0] == 20
    assert label.dtype == torch.int64 and label.shape == (TILE, TILE) and label[0, 0] == 20
    images, labels = next(iter(torch.utils.data.DataLoader(data, batch_size=5)))
    assert images[:, 0, 0, 0].tolist() == [5, 6, 7, 20, 29] and labels.dtype == torch.int64


def test_loader_reads_real_shards_and_bind_checks_the_normalizer(tiny_cfg):
    from hsissl.stages import ingest  # here: the GPU check runs this file without rasterio/mlflow

    ds = ShardDataset(ingest.run(tiny_cfg).dataset_uri)
    split = ds.split("tr")  # 12 tiles in 3 shards of 5
    loader = TileBatches(split, 4, seed=0, drop_last=False, workers=2)
    seen = []
    for images, labels in loader:
        assert images.shape == (4, 32, 64, 64) and labels.shape == (4, 64, 64)
        # which tiles were drawn: match each against the split by content
        all_images, all_labels = split.get(np.arange(len(split)))
        for img, lbl in zip(images.numpy(), labels.numpy(), strict=True):
            match = [i for i in range(len(split)) if np.array_equal(all_images[i], img)]
            assert len(match) == 1 and np.array_equal(all_labels[match[0]], lbl)
            seen += match
    assert sorted(seen) == list(range(12))

    assert bind(ds, ds.normalizer) is ds.normalizer
    other = Normalizer(tuple(m + 1.0 for m in ds.normalizer.mean), ds.normalizer.std)
    with pytest.raises(NormalizerMismatch) as err:
        bind(ds, other)
    message = str(err.value)
    assert f"dataset {ds.uri}" in message and ds.normalizer.fingerprint in message
    assert other.fingerprint in message

    x = device_normalize(images, ds.normalizer, "cpu")
    assert x.dtype == torch.float32 and torch.allclose(x, ds.normalizer(images))


def test_bad_arguments_are_named():
    split = make_split(10)
    with pytest.raises(ValueError, match="rank 3 / world_size 2"):
        TileBatches(split, 2, rank=3, world_size=2)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        TileBatches(split, 8, world_size=2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_batches_normalise_on_the_gpu():
    split = make_split(40)
    images, _ = next(iter(TileBatches(split, 8)))
    assert images.is_pinned()
    norm = Normalizer(tuple(range(32)), (2.0,) * 32)
    x = device_normalize(images, norm, "cuda")
    assert x.is_cuda and torch.allclose(x.cpu(), norm(images))
