"""DeepLabV3+ baseline: the network, the scene batches and the stage end to end (tiny sizes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hsissl.config import ConfigError, load_config
from hsissl.data.shards import ShardDataset
from hsissl.layout import storage_of
from hsissl.segment.baseline import (
    DeepLabV3PlusAux,
    SceneBatches,
    load_baseline,
    smp_encoder_name,
)
from hsissl.segment.finetune import predict
from hsissl.segment.scenes import load_scene
from hsissl.stages import baseline, ingest

REPO = Path(__file__).resolve().parents[1]
TINY = "test_resnet"  # timm's test-sized ResNet (deep 3x3 stem, narrow stages): fast on CPU


def overrides(run_dir: Path, **extra: object) -> list[str]:
    base = {
        "run_dir": run_dir, "synthetic.scenes": "{tr: 3, va: 1, ts: 2}", "synthetic.size": 64,
        "data.scene_size": 64, "data.tile_size": 32, "data.stride": 32, "data.shard_tiles": 5,
        "tracking.uri": "", "pretrain.log_every": 1, "baseline.encoder": TINY,
        "baseline.batch_size": 2, "baseline.max_steps": 20, "baseline.lr": 2e-3,
    }  # fmt: skip
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A run folder holding an ingested generated dataset of 64x64 scenes, 32x32 tiles."""
    run_dir = tmp_path_factory.mktemp("baseline") / "run"
    ingest.run(load_config(REPO / "configs" / "tiny.yaml", overrides(run_dir)))
    return run_dir


@pytest.fixture(scope="module")
def stage_result(tiny_run) -> dict:
    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides(tiny_run))
    return baseline.run(cfg)


def test_encoder_names_are_checked_timm_names():
    assert smp_encoder_name("resnet50c") == "tu-resnet50c"
    assert smp_encoder_name("tu-resnet10t") == "tu-resnet10t"
    with pytest.raises(ConfigError, match="baseline.encoder='resnet50x'"):
        smp_encoder_name("resnet50x")


def test_resnet50c_deeplab_takes_32_bands_and_gives_25_logits():
    torch.manual_seed(0)
    model = DeepLabV3PlusAux("resnet50c", in_channels=32).eval()
    stem = model.net.encoder.model.conv1  # V1c: a deep stem of three 3x3 convolutions
    convs = [m for m in stem.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(3, 3)] * 3 and convs[0].in_channels == 32
    assert model.aux_head.body[0].in_channels == 1024  # ResNet-50 stage 3
    x = torch.randn(1, 32, 40, 40)  # not a multiple of the output stride: padded, cropped back
    with torch.no_grad():
        logits, aux = model(x, with_aux=True)
    assert logits.shape == aux.shape == (1, 25, 40, 40)
    assert torch.isfinite(logits).all() and torch.isfinite(aux).all()


def test_aux_head_is_trained_through_its_own_loss_only():
    torch.manual_seed(0)
    model = DeepLabV3PlusAux(TINY, in_channels=32).train()
    x, y = torch.randn(2, 32, 32, 32), torch.randint(0, 25, (2, 32, 32))
    logits, aux = model(x, with_aux=True)
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=0)
    loss_fn(logits, y).backward(retain_graph=True)
    assert all(p.grad is None for p in model.aux_head.parameters())  # separate branch
    loss_fn(aux, y).backward()
    grads = [p.grad for p in model.aux_head.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_scene_batches_are_seeded_whole_scenes_covering_each_epoch(tiny_run):
    dataset = ShardDataset(
        storage_of(load_config(None, overrides(tiny_run))).join("datasets/whu-ohs")
    )
    first = SceneBatches(dataset, "tr", batch_size=2, seed=3)
    plans = [first.plan() for _ in range(3)]  # 6 draws = 2 epochs of 3 scenes
    drawn = [p.index for plan in plans for p in plan]
    assert sorted(drawn[:3]) == [0, 1, 2] and sorted(drawn[3:]) == [0, 1, 2]
    assert all(p.window == (0, 0, 64, 64) for plan in plans for p in plan)
    again = SceneBatches(dataset, "tr", batch_size=2, seed=3)
    assert [again.plan() for _ in range(3)] == plans
    images, labels = first.load(plans[0])
    assert images.shape == (2, 32, 64, 64) and images.dtype == torch.int16
    assert labels.shape == (2, 64, 64) and labels.dtype == torch.uint8
    scene = load_scene(dataset, "tr", plans[0][0].index)
    expected = scene.label[:, ::-1] if plans[0][0].flip_h else scene.label
    expected = expected[::-1] if plans[0][0].flip_v else expected
    assert np.array_equal(labels[0].numpy(), expected)
    crops = SceneBatches(dataset, "tr", batch_size=2, crop=48, seed=3)
    windows = [p.window for _ in range(4) for p in crops.plan()]
    assert all(w[2:] == (48, 48) and 0 <= w[0] <= 16 and 0 <= w[1] <= 16 for w in windows)
    assert len({w[:2] for w in windows}) > 1  # random offsets


def test_stage_learns_and_writes_the_results_contract(tiny_run, stage_result):
    store = storage_of(load_config(None, overrides(tiny_run)))
    prefix = "results/baseline-deeplabv3plus"
    assert {k.rpartition("/")[2] for k in store.list(prefix)} == {
        "metrics.json", "predictions.npz", "model.pt"}  # fmt: skip
    metrics = json.loads(store.get_bytes(f"{prefix}/metrics.json"))
    assert metrics["kind"] == "baseline" and metrics["head"] == "deeplabv3plus"
    dataset = ShardDataset(store.join("datasets/whu-ohs"))
    assert metrics["normalizer"] == dataset.normalizer.fingerprint
    assert metrics["encoder"] == {"uri": "", "method": "none", "factory": "tu-test_resnet"}

    losses = [h["loss"] for h in metrics["history"]]
    assert [h["step"] for h in metrics["history"]] == list(range(1, 21))
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), f"loss did not fall: {losses}"

    labelled = {}
    for key in ("tile", "scene"):  # tiles of the eval split, and its whole scenes
        result = metrics[key]
        assert 0.0 <= result["miou"] <= 1.0 and 0.0 <= result["oa"] <= 1.0, key
        assert len(result["per_class_iou"]) == 24
        labelled[key] = result["pixels"]
    ts_labels = [load_scene(dataset, "ts", i).label for i in range(2)]
    assert labelled["scene"] == labelled["tile"] == sum(int((lab > 0).sum()) for lab in ts_labels)

    shown = np.load(store.local_path(f"{prefix}/predictions.npz"))
    assert list(shown["scenes"]) == dataset.split("ts").scenes
    assert shown["pred"].shape == shown["label"].shape == (2, 64, 64)
    assert shown["rgb"].shape == (2, 64, 64, 3) and shown["rgb"].dtype == np.uint8
    assert np.array_equal(shown["label"], np.stack(ts_labels))
    assert shown["pred"].min() >= 1 and shown["pred"].max() <= 24  # channel 0 never predicted

    model, normalizer, record = load_baseline(store.join(f"{prefix}/model.pt"))
    assert normalizer == dataset.normalizer and record["step"] == 20
    scene = load_scene(dataset, "ts", 0)
    with torch.no_grad():
        pred = predict(model(normalizer(torch.from_numpy(scene.image))[None]))[0]
    assert np.array_equal(pred.numpy(), shown["pred"][0])  # the saved model is the evaluated one


def test_a_batch_of_one_is_refused_when_the_config_is_loaded(tiny_run):
    with pytest.raises(ConfigError, match="baseline.batch_size=1; expected >= 2"):
        load_config(
            REPO / "configs" / "tiny.yaml", overrides(tiny_run, **{"baseline.batch_size": 1})
        )
