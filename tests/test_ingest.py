"""Ingest end to end: shards, manifest, statistics, idempotency, local and S3 stores."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from hsissl.cli import main
from hsissl.config import load_config
from hsissl.data.geotiff import read_image, read_label, write_label
from hsissl.data.scenes import DataContractError
from hsissl.data.shards import ShardDataset, verify_file
from hsissl.data.tiling import untile
from hsissl.layout import storage_of
from hsissl.stages import ingest


def scenes_of(root: Path, split: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {p.stem: (read_image(p), read_label(root / split / "label" / p.name))
            for p in sorted((root / split / "image").glob("*.tif"))}  # fmt: skip


def test_ingest_writes_shards_that_give_back_every_scene(tiny_cfg, whu_root):
    result = ingest.run(tiny_cfg)
    manifest = result.manifest
    ds = ShardDataset(result.dataset_uri, verify=True)  # checksums verified on open
    assert ds.splits == ["tr", "va", "ts"]
    tr = ds.split("tr")
    assert len(tr) == manifest["splits"]["tr"]["tiles"] == 3 * 4
    assert len(manifest["splits"]["tr"]["shards"]) == 3  # 12 tiles, 5 per shard
    for split in ds.splits:
        view = ds.split(split)
        images, labels = view.get(np.arange(len(view)))
        for index, (name, (image, label)) in enumerate(scenes_of(whu_root, split).items()):
            mine = view.sources[:, 0] == index
            positions = [tuple(p) for p in view.sources[mine, 1:]]
            assert view.scenes[index] == name
            assert np.array_equal(untile(images[mine], positions, 128, 128), image)
            assert np.array_equal(untile(labels[mine], positions, 128, 128), label)
            counts = np.bincount(labels.ravel(), minlength=25)
        assert manifest["splits"][split]["class_pixels"] == counts.tolist()


def test_band_stats_and_normalizer_come_from_the_training_split_only(tiny_cfg, whu_root):
    manifest = ingest.run(tiny_cfg).manifest
    pixels = np.concatenate(
        [img.reshape(32, -1) for img, _ in scenes_of(whu_root, "tr").values()], axis=1
    )
    np.testing.assert_allclose(manifest["band_stats"]["mean"], pixels.mean(axis=1), rtol=1e-9)
    np.testing.assert_allclose(manifest["band_stats"]["std"], pixels.std(axis=1), rtol=1e-9)
    ds = ShardDataset(storage_of(tiny_cfg).join("datasets/whu-ohs"))
    assert ds.normalizer.fingerprint == manifest["normalizer"]["fingerprint"]
    assert list(ds.normalizer.mean) == manifest["band_stats"]["mean"]


def test_manifest_records_checksums_config_and_sources(tiny_cfg):
    result = ingest.run(tiny_cfg)
    store = storage_of(tiny_cfg)
    manifest = json.loads(store.get_bytes("datasets/whu-ohs/manifest.json"))
    assert manifest == result.manifest
    assert manifest["config"]["tile_size"] == 64 and manifest["bands"] == 32
    for shard in manifest["splits"]["va"]["shards"]:
        for entry in shard["files"].values():
            verify_file(store.local_path(f"datasets/whu-ohs/{entry['key']}"), entry["sha256"])
    assert "tile_size: 64" in store.get_bytes("datasets/whu-ohs/config.yaml").decode()
    assert (
        Path(tiny_cfg.run_dir) / "ingest" / "config.yaml"
    ).is_file()  # resolved config beside the run


EXPECTED_MANIFEST = Path(__file__).parent / "data" / "ingest_manifest_expected.json"


def test_manifest_is_the_one_written_before_hsissl_data_manifest_owned_it(tiny_cfg):
    """Shard checksums and sizes, split entries, statistics and key order of the manifest of a
    fixed tiny input, as ingest wrote them before the manifest had its own module; the file
    is that dict as indented JSON. (created, source, fingerprint and config depend on the run.)"""
    ingest.run(tiny_cfg)
    raw = storage_of(tiny_cfg).get_bytes("datasets/whu-ohs/manifest.json")
    manifest = json.loads(raw)
    assert raw == json.dumps(manifest, indent=1).encode()
    expected = json.loads(EXPECTED_MANIFEST.read_text())
    assert list(manifest) == expected["keys"]
    assert list(manifest["config"]) == expected["config_keys"]
    for key, value in expected["manifest"].items():
        if key == "normalizer":
            assert manifest[key]["fingerprint"] == value["fingerprint"]
        else:
            assert manifest[key] == value, key
    assert manifest["class_names"][1] == "Paddy field" and len(manifest["band_centres_nm"]) == 32


def test_ingest_is_idempotent_and_redoes_work_when_the_config_changes(tiny_cfg, tmp_path):
    first = ingest.run(tiny_cfg)
    shard = storage_of(tiny_cfg).local_path("datasets/whu-ohs/tr/images-00000.npy")
    stamp = shard.stat().st_mtime_ns
    again = ingest.run(tiny_cfg)
    assert again.reused and again.manifest == first.manifest
    assert shard.stat().st_mtime_ns == stamp
    cfg32 = load_config(None, [f"run_dir={tiny_cfg.run_dir}", f"data.source={tiny_cfg.data.source}",
                               "data.scene_size=128", "data.tile_size=32", "data.stride=32"])  # fmt: skip
    changed = ingest.run(cfg32)
    assert not changed.reused and changed.manifest["splits"]["tr"]["tiles"] == 3 * 16
    keys = storage_of(cfg32).list("datasets/whu-ohs")
    assert len([k for k in keys if "/tr/images-" in k]) == 1  # old shards replaced, not mixed


def test_drop_unlabelled_tiles(tiny_cfg, whu_root):
    label_path = whu_root / "tr" / "label" / "T0000.tif"
    label = read_label(label_path)
    label[:64, :64] = 0  # one whole tile unlabelled
    write_label(label_path, label, transform=None)
    cfg = load_config(None, [f"run_dir={tiny_cfg.run_dir}", f"data.source={whu_root}", "data.scene_size=128",
                             "data.drop_unlabelled=true", "data.splits=[tr]"])  # fmt: skip
    manifest = ingest.run(cfg).manifest
    assert manifest["splits"]["tr"]["tiles"] == 3 * 4 - 1


def test_ingest_is_tracked_in_mlflow(tiny_cfg):
    ingest.run(tiny_cfg)
    db = Path(tiny_cfg.run_dir) / "mlflow.db"
    with sqlite3.connect(db) as con:
        names = [r[0] for r in con.execute("select name from runs where status='FINISHED'")]
        metrics = {r[0] for r in con.execute("select key from metrics")}
        params = dict(con.execute("select key, value from params"))
    assert names == ["ingest"]
    assert {"tiles_tr", "tiles_va", "source_mb_per_s"} <= metrics
    assert params["data.tile_size"] == "64"


def test_cli_ingest_and_exit_codes(tiny_cfg, whu_root, tmp_path, capsys):
    args = [
        "ingest",
        f"run_dir={tiny_cfg.run_dir}",
        f"data.source={whu_root}",
        "data.scene_size=128",
    ]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["dataset_uri"].startswith("file://")
    assert main(["ingest", "data.tile_sze=3"]) == 2
    assert "unknown config key 'data.tile_sze'" in capsys.readouterr().err
    (whu_root / "ts" / "label" / "T0004.tif").unlink()
    assert main(args + ["data.name=other"]) == 2
    assert "label file: found none" in capsys.readouterr().err
    assert main(args + ["--report"]) == 2


def test_ingest_into_s3_and_read_back(tiny_cfg, s3_bucket, tmp_path):
    cfg = load_config(None, [f"run_dir={tiny_cfg.run_dir}", f"data.source={tiny_cfg.data.source}",
                             "data.scene_size=128", "data.shard_tiles=5", f"storage.uri={s3_bucket}/store"])  # fmt: skip
    result = ingest.run(cfg)
    assert result.dataset_uri == f"{s3_bucket}/store/datasets/whu-ohs"
    ds = ShardDataset(result.dataset_uri, cache_dir=tmp_path / "cache", verify=True)
    local = ShardDataset(ingest.run(tiny_cfg).dataset_uri)
    a, b = ds.split("tr").get([0, 5, 11]), local.split("tr").get([0, 5, 11])
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_interrupted_s3_ingest_commits_nothing(tiny_cfg, whu_root, s3_bucket):
    # The last training scene breaks the contract only in its pixels, so shards are already
    # uploaded when the violation is found: the transaction must remove them.
    label_path = whu_root / "ts" / "label" / "T0004.tif"
    label = read_label(label_path)
    label[0, 0] = 99
    write_label(label_path, label, transform=None)
    cfg = load_config(None, [f"run_dir={tiny_cfg.run_dir}", f"data.source={whu_root}", "data.scene_size=128",
                             "data.shard_tiles=2", f"storage.uri={s3_bucket}"])  # fmt: skip
    with pytest.raises(DataContractError, match="label values: found max 99"):
        ingest.run(cfg)
    assert storage_of(cfg).list("") == []


@pytest.mark.realdata
def test_ingest_real_mat_scenes(shared_data, tmp_path):
    """The .mat adapter path: real cubes resampled to the 32 OHS bands, tiled and sharded."""
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", f"data.source={shared_data}", "data.name=real",
                             "data.tile_size=32", "data.stride=32"])  # fmt: skip
    result = ingest.run(cfg)
    manifest = result.manifest
    assert list(manifest["splits"]) == ["tr"] and manifest["config"]["scene_size"] is None
    assert {"Indian_subset", "houston_dataset", "Samson"} <= set(manifest["splits"]["tr"]["scenes"])
    ds = ShardDataset(result.dataset_uri, verify=True)
    images, labels = ds.split("tr").get([0, len(ds.split("tr")) - 1])
    assert images.shape[1:] == (32, 32, 32) and labels.dtype == np.uint8
    assert all(s > 0 for s in manifest["band_stats"]["std"])
