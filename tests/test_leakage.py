"""Split leakage in ingest (hsissl.data.leakage): scene names, identical tiles and overlapping
footprints across splits are refused by default, naming the files, and recorded when allowed."""

from __future__ import annotations

import numpy as np
import pytest
from rasterio.transform import Affine

from hsissl.config import load_config
from hsissl.data import leakage
from hsissl.data.geotiff import default_transform, write_image, write_label
from hsissl.data.scenes import DataContractError, SceneHeader, ScenePair
from hsissl.layout import storage_of
from hsissl.stages import ingest

SIZE = 128


def scene(root, split, name, image, transform=None, crs="EPSG:32650"):
    label = np.ones((SIZE, SIZE), dtype=np.uint8)
    write_image(root / split / "image" / f"{name}.tif", image, transform, crs)
    write_label(root / split / "label" / f"{name}.tif", label, transform, crs)
    return root / split / "image" / f"{name}.tif"


def random_image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 10000, (32, SIZE, SIZE), dtype=np.int16)


def cfg_for(tmp_path, root, *extra):
    return load_config(None, [f"run_dir={tmp_path / 'run'}", f"data.source={root}", f"data.scene_size={SIZE}",
                              "data.splits=[tr, va]", "tracking.uri=", *extra])  # fmt: skip


def refused_then_recorded(tmp_path, root, kind: str, files) -> dict:
    """Ingest refuses (naming ``files``, writing nothing); allowed, it records ``kind``."""
    cfg = cfg_for(tmp_path, root)
    with pytest.raises(DataContractError) as info:
        ingest.run(cfg)
    message = str(info.value)
    assert f"split leakage ({kind})" in message and "data.allow_split_overlap=true" in message
    assert all(str(f) in message for f in files), message
    assert storage_of(cfg).list("") == []
    report = ingest.run(cfg, report=True)
    assert any(v.field == f"split leakage ({kind})" for v in report.violations)
    manifest = ingest.run(cfg_for(tmp_path, root, "data.allow_split_overlap=true")).manifest
    assert manifest["leakage"]["allowed"] is True
    assert manifest["leakage"]["counts"][kind] >= 1
    assert {o["kind"] for o in manifest["leakage"]["overlaps"]} >= {kind}
    return manifest


def test_clean_dataset_passes_and_records_an_empty_check(tmp_path):
    root = tmp_path / "whu"
    scene(root, "tr", "a", random_image(0), default_transform(0, SIZE))
    scene(root, "va", "b", random_image(1), default_transform(1, SIZE))  # touches a: no overlap
    manifest = ingest.run(cfg_for(tmp_path, root)).manifest
    assert manifest["leakage"]["counts"] == {"scene name": 0, "footprint": 0, "tile content": 0}
    assert manifest["leakage"]["allowed"] is False and manifest["conversion"] == {}


def test_scene_name_in_two_splits(tmp_path):
    root = tmp_path / "whu"
    a = scene(root, "tr", "same", random_image(0), default_transform(0, SIZE))
    b = scene(root, "va", "same", random_image(1), default_transform(5, SIZE))
    refused_then_recorded(tmp_path, root, "scene name", [a, b])


def test_identical_tile_across_splits(tmp_path):
    root = tmp_path / "whu"
    first, second = random_image(0), random_image(1)
    second[:, 64:, :64] = first[:, :64, 64:]  # one 64-px tile copied into the other split
    a = scene(root, "tr", "a", first)  # no georeference: only the content can tell
    b = scene(root, "va", "b", second)
    manifest = refused_then_recorded(tmp_path, root, "tile content", [a, b])
    (overlap,) = manifest["leakage"]["overlaps"]
    assert overlap["detail"].startswith("1 tile(s) identical (e.g. tile at y=64, x=0 = y=0, x=64)")


def test_constant_tiles_are_not_leakage(tmp_path):
    root = tmp_path / "whu"
    first, second = random_image(0), random_image(1)
    first[:, :64, :64] = second[:, :64, :64] = 0  # e.g. a blank border in both
    scene(root, "tr", "a", first)
    scene(root, "va", "b", second)
    manifest = ingest.run(cfg_for(tmp_path, root)).manifest
    assert manifest["leakage"]["counts"]["tile content"] == 0
    assert manifest["leakage"]["constant_tiles_skipped"] == 2


def test_overlapping_footprints_across_splits(tmp_path):
    root = tmp_path / "whu"
    a = scene(root, "tr", "a", random_image(0), Affine(10, 0, 500000, 0, -10, 3400000))
    b = scene(root, "va", "b", random_image(1), Affine(10, 0, 500640, 0, -10, 3400000))
    manifest = refused_then_recorded(tmp_path, root, "footprint", [a, b])
    (overlap,) = manifest["leakage"]["overlaps"]
    assert overlap["detail"].startswith("footprint overlaps by 640 x 1280 CRS units (50.0 %")


def test_footprints_in_different_crs_are_compared_in_degrees(tmp_path):
    """The same ground in UTM 50N and in EPSG:4326 (transformed with rasterio 1.4.4 / PROJ)."""
    from rasterio.warp import transform_bounds

    root = tmp_path / "whu"
    utm = Affine(10, 0, 500000, 0, -10, 3400000)
    a = scene(root, "tr", "a", random_image(0), utm)
    left, bottom, right, top = transform_bounds("EPSG:32650", "EPSG:4326", 500000, 3398720, 501280, 3400000)  # fmt: skip
    geo = Affine((right - left) / SIZE, 0, left, 0, -(top - bottom) / SIZE, top)
    b = scene(root, "va", "b", random_image(1), geo, crs="EPSG:4326")
    headers = {s: [SceneHeader(ScenePair(s, p.stem, p, p), SIZE, SIZE, "int16", None)]
               for s, p in (("tr", a), ("va", b))}  # fmt: skip
    (overlap,) = leakage.footprint_overlaps(headers)
    assert overlap.kind == "footprint" and "degrees" in overlap.detail
    far = scene(root, "ts", "c", random_image(2), default_transform(50, SIZE))
    headers["ts"] = [SceneHeader(ScenePair("ts", "c", far, far), SIZE, SIZE, "int16", None)]
    assert len(leakage.footprint_overlaps(headers)) == 1  # the far scene overlaps nothing


def test_tile_digests_skip_constant_tiles():
    tiles = np.stack(
        [np.zeros((2, 4, 4), np.int16), np.arange(32, dtype=np.int16).reshape(2, 4, 4)]
    )
    digests = leakage.tile_digests(tiles)
    assert digests[0] is None and len(digests[1]) == leakage.DIGEST_BYTES
