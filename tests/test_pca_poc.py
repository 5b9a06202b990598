"""PCA proof of concept: the PCA itself, the band decoder, and the stage with the MAE check."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA as SklearnPCA

from hsissl.config import ConfigError, load_config
from hsissl.data.shards import ShardDataset
from hsissl.layout import storage_of
from hsissl.pca import (
    PCA,
    BandDecoder,
    ViTBandDecoder,
    fit_pca,
    project,
    reconstruct,
    sample_pixels,
)
from hsissl.pretrain.mae import MAERecipe
from hsissl.pretrain.trainer import pretrain
from hsissl.stages import ingest, pca_poc
from hsissl.storage import open_storage

REPO = Path(__file__).resolve().parents[1]


def low_rank_pixels(n: int = 4000, noise: float = 1e-3, seed: int = 0) -> np.ndarray:
    """(n, 32) spectra: linear mixtures of 3 sources plus a little noise."""
    rng = np.random.default_rng(seed)
    sources = rng.normal(size=(n, 3)) * [3.0, 2.0, 1.0]  # (n, 3), distinct variances
    mixing = rng.normal(size=(3, 32))
    return sources @ mixing + 5.0 + noise * rng.normal(size=(n, 32))


def test_pca_of_low_rank_spectra_explains_them_and_reconstructs_them():
    pixels = low_rank_pixels()
    pca = fit_pca(pixels, 3)
    ratio = pca.explained_variance_ratio
    assert ratio.sum() > 0.99 and ratio.sum() <= 1.0
    assert np.all(np.diff(ratio) <= 0)  # sorted, largest first
    np.testing.assert_allclose(pca.components @ pca.components.T, np.eye(3), atol=1e-12)
    error = np.mean((pca.inverse_transform(pca.transform(pixels)) - pixels) ** 2)
    assert error < 1e-5  # ~ the noise variance (1e-6)
    one = fit_pca(pixels, 1)
    assert 0 < one.explained_variance_ratio.sum() < ratio.sum() - 0.01


def test_pca_matches_scikit_learn_and_round_trips_through_json():
    pixels = low_rank_pixels(noise=0.3, seed=1)
    ours, theirs = fit_pca(pixels, 3), SklearnPCA(n_components=3).fit(pixels)
    np.testing.assert_allclose(ours.explained_variance, theirs.explained_variance_, rtol=1e-9)
    np.testing.assert_allclose(
        ours.explained_variance_ratio, theirs.explained_variance_ratio_, rtol=1e-9
    )
    np.testing.assert_allclose(np.abs(ours.components), np.abs(theirs.components_), atol=1e-9)
    again = PCA.from_dict(json.loads(json.dumps(ours.to_dict())))
    np.testing.assert_array_equal(again.components, ours.components)
    assert again.total_variance == ours.total_variance
    with pytest.raises(ValueError, match="pca.components must be in 1..32"):
        fit_pca(pixels, 33)


def test_torch_projection_and_untrained_decoder_equal_the_pca_inverse():
    pca = fit_pca(low_rank_pixels(noise=0.2), 3)
    mean, comps = pca.tensors()
    images = torch.randn(2, 32, 8, 8, dtype=torch.float64).float() + 5.0
    scores = project(images, mean, comps)  # (2, 3, 8, 8)
    flat = images.permute(0, 2, 3, 1).reshape(-1, 32).double().numpy()
    expected = pca.transform(flat).reshape(2, 8, 8, 3).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-4, atol=1e-4)
    decoder = BandDecoder(pca)
    with torch.no_grad():
        assert torch.equal(decoder(scores), reconstruct(scores, mean, comps))


def test_three_channel_vit_decoder_starts_at_the_pca_inverse_and_learns():
    pca = fit_pca(low_rank_pixels(noise=0.2), 3)
    mean, comps = pca.tensors()
    torch.manual_seed(0)
    images = torch.randn(4, 32, 64, 64)
    scores = project(images, mean, comps)  # (4, 3, 64, 64)
    decoder = ViTBandDecoder(pca, "vit_tiny_patch8_64")
    assert decoder.vit.patch_embed.proj.in_channels == 3
    with torch.no_grad():
        assert torch.equal(decoder(scores), reconstruct(scores, mean, comps))
    opt = torch.optim.AdamW(decoder.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.mse_loss(decoder(scores), images)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


# -- the stage on a generated dataset ------------------------------------------------------------
def overrides(run_dir: Path, **extra: object) -> list[str]:
    base = {
        "run_dir": run_dir, "synthetic.scenes": "{tr: 4, va: 1, ts: 1}", "synthetic.size": 128,
        "data.scene_size": 128, "tracking.uri": "", "pretrain.batch_size": 8,
        "pretrain.max_steps": 6, "pretrain.log_every": 1, "pretrain.knn_tiles": 16,
        "pretrain.loader_threads": 1, "mae.model": "mae_vit_tiny_patch8_64",
        "pca.fit_pixels": 8000, "pca.decoder_steps": 20, "pca.batch_size": 4, "pca.lr": 1e-3,
    }  # fmt: skip
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def cfg_for(run_dir: Path, **extra: object):
    return load_config(REPO / "configs" / "tiny.yaml", overrides(run_dir, **extra))


@pytest.fixture(scope="module")
def pca_run(tmp_path_factory) -> tuple[Path, str, dict]:
    """(run folder, MAE encoder URI, stage result) on a small generated dataset."""
    run_dir = tmp_path_factory.mktemp("pca") / "run"
    ingest.run(cfg_for(run_dir))
    encoder_uri = pretrain(cfg_for(run_dir), MAERecipe, "pretrain-mae")["encoder_uri"]
    result = pca_poc.run(cfg_for(run_dir, **{"pca.encoder": encoder_uri}))
    return run_dir, encoder_uri, result


def test_sampled_training_pixels_are_normalised(pca_run):
    dataset = ShardDataset(storage_of(cfg_for(pca_run[0])).join("datasets/whu-ohs"))
    pixels = sample_pixels(dataset.split("tr"), dataset.normalizer, 5000, seed=0)
    assert pixels.shape == (5000, 32) and pixels.dtype == np.float64
    assert np.all(np.abs(pixels.mean(axis=0)) < 0.2)  # the statistics are the training split's
    assert np.all(np.abs(pixels.std(axis=0) - 1.0) < 0.2)
    again = sample_pixels(dataset.split("tr"), dataset.normalizer, 5000, seed=0)
    np.testing.assert_array_equal(pixels, again)


def test_stage_writes_pca_and_metrics_with_every_reconstruction_error(pca_run):
    run_dir, encoder_uri, result = pca_run
    store = storage_of(cfg_for(run_dir))
    record = json.loads(store.get_bytes("results/pca-poc/pca.json"))
    metrics = json.loads(store.get_bytes("results/pca-poc/metrics.json"))
    dataset = ShardDataset(store.join("datasets/whu-ohs"))
    assert record["dataset"] == {"uri": dataset.uri, "fingerprint": dataset.manifest["fingerprint"],
                                 "normalizer": dataset.normalizer.fingerprint}  # fmt: skip
    assert np.asarray(record["components"]).shape == (3, 32) and record["fit_pixels"] == 8000

    assert metrics["kind"] == "pca" and metrics["normalizer"] == dataset.normalizer.fingerprint
    assert metrics["encoder"] == {"uri": encoder_uri, "method": "mae",
                                  "factory": "mae_vit_tiny_patch8_64"}  # fmt: skip
    ratio = metrics["explained_variance"]
    assert len(ratio) == 3 and ratio == sorted(ratio, reverse=True) and sum(ratio) <= 1.0
    np.testing.assert_allclose(metrics["explained_variance_cumulative"], np.cumsum(ratio))
    assert result.explained_variance == ratio
    mse = metrics["per_band_mse"]
    assert set(mse) == {"pca", "decoder", "mae"}
    assert all(len(v) == 32 and min(v) >= 0 for v in mse.values())
    assert metrics["eval_split"] == "va" and metrics["eval_tiles"] == 4
    # The decoder starts as the PCA inverse (see the unit test), so training must lower it.
    assert np.mean(mse["decoder"]) < np.mean(mse["pca"])
    assert [h["step"] for h in metrics["history"]] == list(range(1, 21))
    # Residual variance of the 3 components: PCA error ~ (1 - explained) x total / bands.
    expected = (1 - sum(ratio)) * record["total_variance"] / 32
    assert 0.2 * expected < np.mean(mse["pca"]) < 5 * expected


def test_mae_check_scores_masked_pixels_and_keeps_visible_ones(pca_run):
    store = storage_of(cfg_for(pca_run[0]))
    sample = np.load(store.local_path("results/pca-poc/reconstructions.npz"))
    original, mae, mask = sample["original"], sample["mae"], sample["mae_mask"]
    assert original.shape == mae.shape == sample["pca"].shape == (32, 64, 64)
    assert mask.shape == (64, 64) and mask.mean() == pytest.approx(0.75)
    np.testing.assert_array_equal(mae[:, ~mask], original[:, ~mask])  # visible: pasted back
    assert not np.allclose(mae[:, mask], original[:, mask])  # masked: predicted


def test_stage_with_the_vit_decoder(pca_run):
    run_dir = pca_run[0]
    result = pca_poc.run(cfg_for(run_dir, **{"pca.decoder": "vit", "pca.vit_model": "vit_tiny_patch8_64",
                                             "pca.name": "pca-vit"}))  # fmt: skip
    metrics = json.loads(open_storage(result.results).get_bytes("metrics.json"))
    errors = metrics["per_band_mse"]
    assert metrics["config"]["decoder"] == "vit" and len(errors["decoder"]) == 32
    assert np.mean(errors["decoder"]) <= np.mean(errors["pca"]) + 1e-6


def test_stage_refuses_bad_settings_and_non_mae_checkpoints(pca_run, tmp_path):
    run_dir, encoder_uri, _ = pca_run
    with pytest.raises(ConfigError, match="pca.components=0"):
        pca_poc.run(cfg_for(run_dir, **{"pca.components": 0}))
    # the upper bound is the dataset's: refused where it is read, in the config errors' form
    with pytest.raises(ConfigError, match=r"datasets/whu-ohs: config key pca.components=40; "
                                          r"expected 1..32 \(its bands\)"):  # fmt: skip
        pca_poc.run(cfg_for(run_dir, **{"pca.components": 40, "pca.fit_pixels": 1000}))
    store = storage_of(cfg_for(run_dir))
    key = encoder_uri.rpartition("/checkpoints/")[2]
    store.put_bytes("checkpoints/alone/encoder.pt", store.get_bytes(f"checkpoints/{key}"))
    with pytest.raises(FileNotFoundError, match="train.pt"):
        pca_poc.run(cfg_for(run_dir, **{"pca.encoder": store.join("checkpoints/alone/encoder.pt")}))
