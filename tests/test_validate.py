"""The data contract: one test per malformed-input class; nothing may reach the store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio

from hsissl.data.geotiff import write_image, write_label
from hsissl.data.scenes import DataContractError
from hsissl.layout import storage_of
from hsissl.stages import ingest


def scene(root: Path, split: str = "tr", name: str = "T0000.tif") -> tuple[Path, Path]:
    return root / split / "image" / name, root / split / "label" / name


def break_wrong_band_count(root):
    img, _ = scene(root)
    write_image(img, np.zeros((31, 128, 128), np.int16))
    return img, "band count: found 31, expected 32"


def break_wrong_dtype(root):
    img, _ = scene(root)
    write_image(img, np.zeros((32, 128, 128), np.uint8))
    return img, "dtype: found uint8, expected int16"


def break_label_25(root):
    _, lbl = scene(root)
    label = np.zeros((128, 128), np.uint8)
    label[5, 7] = 25
    write_label(lbl, label)
    return lbl, "label values: found max 25 (1 pixels > 24), expected 0 (unlabelled) to 24"


def break_size_mismatch(root):
    _, lbl = scene(root)
    write_label(lbl, np.zeros((128, 96), np.uint8))
    return lbl, "size: found 128x96, expected 128x128 (same as its image)"


def break_missing_label(root):
    img, lbl = scene(root)
    lbl.unlink()
    return img, "label file: found none, expected"


def break_truncated_tiff(root):
    img, _ = scene(root)
    data = img.read_bytes()
    img.write_bytes(data[: len(data) // 2])
    return img, "unreadable"


def break_nan_in_float(root):
    img, _ = scene(root)
    data = np.full((32, 128, 128), 1234.0, np.float32)
    data[3, 10, 10] = np.nan
    write_image(img, data)
    return img, "NaN pixels: found 1 NaN values, expected finite reflectance values"


def break_empty_split(root):
    for f in (root / "va").rglob("*.tif"):
        f.unlink()
    return root / "va", "split: found no scenes"


def break_georeference(root):
    img, lbl = scene(root)
    with rasterio.open(lbl) as src:
        label = src.read(1)
    write_label(lbl, label, transform=rasterio.transform.from_origin(0, 0, 30, 30))
    return lbl, "georeference"


def break_nodata(root):
    img, _ = scene(root)
    data = np.full((32, 128, 128), 500, np.int16)
    data[:, 0, 0] = -9999
    with rasterio.open(img) as src:
        profile = src.profile
    profile.update(nodata=-9999)
    with rasterio.open(img, "w", **profile) as dst:
        dst.write(data)
    return img, "nodata: found 32 values equal nodata (-9999)"


BREAKERS = [break_wrong_band_count, break_wrong_dtype, break_label_25, break_size_mismatch,
            break_missing_label, break_truncated_tiff, break_nan_in_float, break_empty_split,
            break_georeference, break_nodata]  # fmt: skip


@pytest.mark.parametrize("breaker", BREAKERS, ids=lambda f: f.__name__.removeprefix("break_"))
def test_each_violation_is_named_and_nothing_is_written(breaker, tiny_cfg, whu_root):
    path, message = breaker(whu_root)
    with pytest.raises(DataContractError) as info:
        ingest.run(tiny_cfg)
    text = str(info.value)
    assert str(path) in text and message in text, text
    store = storage_of(tiny_cfg)
    assert store.list("") == [], "a failed ingest left objects in the store"


def test_report_lists_every_violation_and_writes_nothing(tiny_cfg, whu_root):
    break_label_25(whu_root)
    img2 = whu_root / "tr" / "image" / "T0001.tif"
    write_image(img2, np.zeros((30, 128, 128), np.int16))
    result = ingest.run(tiny_cfg, report=True)
    texts = [str(v) for v in result.violations]
    assert any("label values" in t for t in texts) and any(
        "band count: found 30" in t for t in texts
    )
    assert storage_of(tiny_cfg).list("") == []


def test_report_on_clean_data_is_empty(tiny_cfg):
    assert ingest.run(tiny_cfg, report=True).violations == []
