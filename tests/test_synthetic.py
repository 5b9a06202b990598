"""The generated dataset: WHU-OHS layout and format, determinism, structure, learnability."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
from scipy import ndimage
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

from hsissl.config import SyntheticConfig, load_config
from hsissl.data.geotiff import default_transform, read_image, read_label
from hsissl.data.ohs import NUM_BANDS, NUM_CLASSES, REFLECTANCE_SCALE, band_index
from hsissl.data.scenes import check_header, discover, read_scene
from hsissl.data.synthetic import class_signatures, generate_scene, make_synthetic

SIZE = 128


def _scenes(root: Path, split: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(image (32, H, W), label (H, W))] of one split, in name order."""
    names = sorted(p.name for p in (root / split / "image").glob("*.tif"))
    return [
        (read_image(root / split / "image" / n), read_label(root / split / "label" / n))
        for n in names
    ]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """6 training and 6 test scenes of 128 px: enough for every class and a fair classifier."""
    out = tmp_path_factory.mktemp("synthetic")
    return make_synthetic(out, SyntheticConfig(scenes={"tr": 6, "ts": 6}, size=SIZE, seed=0))


def test_layout_and_format(tmp_path: Path) -> None:
    cfg = SyntheticConfig(scenes={"tr": 2, "va": 1, "ts": 1}, size=SIZE, seed=3)
    root = make_synthetic(tmp_path, cfg)
    expected = {"tr": ["S0001", "S0002"], "va": ["S0003"], "ts": ["S0004"]}
    for split, names in expected.items():
        for kind in ("image", "label"):
            assert sorted(p.stem for p in (root / split / kind).glob("*.tif")) == names
        for name in names:
            index = int(name[1:]) - 1
            with rasterio.open(root / split / "image" / f"{name}.tif") as img:
                assert (img.count, img.height, img.width) == (NUM_BANDS, SIZE, SIZE)
                assert img.dtypes[0] == "int16"
                assert img.crs is not None
                assert img.transform.almost_equals(default_transform(index, SIZE))
                pixels = img.read()
            with rasterio.open(root / split / "label" / f"{name}.tif") as lbl:
                assert (lbl.count, lbl.dtypes[0]) == (1, "uint8")
                assert (lbl.crs, lbl.transform) == (img.crs, img.transform)
                label = lbl.read(1)
            assert 0 <= pixels.min() and pixels.max() <= REFLECTANCE_SCALE
            assert label.shape == (SIZE, SIZE) and label.max() <= NUM_CLASSES
    # The project's own data contract accepts it.
    pairs, violations = discover(root, ["tr", "va", "ts"])
    assert violations == []
    for pair in (p for found in pairs.values() for p in found):
        header, problems = check_header(pair, scene_size=SIZE, min_size=64)
        assert problems == []
        assert read_scene(header)[2] == []


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    cfg = SyntheticConfig(scenes={"tr": 2, "ts": 1}, size=64, seed=5)
    a, b = make_synthetic(tmp_path / "a", cfg), make_synthetic(tmp_path / "b", cfg)
    files = sorted(p.relative_to(a) for p in a.rglob("*.tif"))
    assert len(files) == 6
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    other = make_synthetic(tmp_path / "c", SyntheticConfig(scenes=cfg.scenes, size=64, seed=6))
    assert all((a / f).read_bytes() != (other / f).read_bytes() for f in files)


def test_generate_scene_is_seeded() -> None:
    img1, lbl1 = generate_scene(np.random.default_rng(7), 96)
    img2, lbl2 = generate_scene(np.random.default_rng(7), 96)
    img3, lbl3 = generate_scene(np.random.default_rng(8), 96)
    assert img1.shape == (NUM_BANDS, 96, 96) and img1.dtype == np.int16
    assert lbl1.shape == (96, 96) and lbl1.dtype == np.uint8
    assert np.array_equal(img1, img2) and np.array_equal(lbl1, lbl2)
    assert not np.array_equal(img1, img3) and not np.array_equal(lbl1, lbl3)


def test_labels_form_regions_not_salt_and_pepper() -> None:
    fractions, classes = [], set()
    for seed in range(4):
        _, label = generate_scene(np.random.default_rng(seed), 256)
        same = np.concatenate(
            [(label[1:] == label[:-1]).ravel(), (label[:, 1:] == label[:, :-1]).ravel()]
        )
        fractions.append(same.mean())
        classes |= set(np.unique(label).tolist())
    assert np.mean(fractions) > 0.9  # regions, not noise ...
    assert np.mean(fractions) < 0.995  # ... and many of them, not one blob
    assert len(classes - {0}) >= 10


def test_every_class_in_training_split_and_imbalanced(tmp_path: Path) -> None:
    cfg = SyntheticConfig(scenes={"tr": 8}, size=256, seed=1)
    labels = np.stack([label for _, label in _scenes(make_synthetic(tmp_path, cfg), "tr")])
    counts = np.bincount(labels.ravel(), minlength=NUM_CLASSES + 1)
    assert (counts[1:] > 0).all(), f"classes missing from tr: {np.flatnonzero(counts[1:] == 0) + 1}"
    assert counts[1:].max() > 10 * counts[1:].min()  # skewed like WHU-OHS
    assert 0.03 < counts[0] / counts.sum() < 0.35  # unlabelled_fraction 0.15 of regions


def test_unlabelled_fraction_zero_labels_everything() -> None:
    _, label = generate_scene(np.random.default_rng(0), 128, unlabelled_fraction=0.0)
    assert label.min() >= 1


def test_spectra_are_plausible() -> None:
    sig = class_signatures()  # (24, 32)
    red, nir, blue = band_index(670), band_index(850), band_index(480)
    vegetation, water = sig[[2, 5]], sig[[10, 23]]  # woodland, other forest; lake, ocean
    assert (vegetation[:, nir] > 3 * vegetation[:, red]).all()  # red edge
    assert (water[:, nir] < 0.5 * water[:, blue]).all()  # water: low, decreasing
    assert (sig[14:23].mean(1) > sig[10:12].mean(1).max()).all()  # built-up/bare brighter


def test_learnable_per_pixel_but_not_trivially_and_context_helps(dataset: Path) -> None:
    def features(split: str, window: int) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for image, label in _scenes(dataset, split):
            logr = np.log1p(image.astype(np.float32))  # (32, H, W)
            if window > 1:  # spatial context: the mean spectrum of a window x window patch
                logr = ndimage.uniform_filter(logr, size=(1, window, window))
            keep = label > 0
            xs.append(logr[:, keep].T)
            ys.append(label[keep])
        return np.concatenate(xs), np.concatenate(ys)

    accuracy = {}
    for window in (1, 5):
        x_tr, y_tr = features("tr", window)
        x_ts, y_ts = features("ts", window)
        seen = np.isin(y_ts, np.unique(y_tr))
        classifier = LinearDiscriminantAnalysis().fit(x_tr, y_tr)
        accuracy[window] = float((classifier.predict(x_ts[seen]) == y_ts[seen]).mean())
        assert len(np.unique(y_ts[seen])) >= 10
    assert 0.5 < accuracy[1] < 0.99, accuracy  # learnable per pixel, but not trivially
    assert accuracy[5] > accuracy[1] + 0.05, accuracy  # and neighbours carry information


def test_a_full_size_scene_is_fast() -> None:
    generate_scene(np.random.default_rng(0), 64)  # warm-up (imports, caches)
    start = time.perf_counter()
    image, _ = generate_scene(np.random.default_rng(1), 512)
    elapsed = time.perf_counter() - start
    assert image.shape == (NUM_BANDS, 512, 512)
    assert elapsed < 3.0, f"512 px scene took {elapsed:.2f} s (typical: ~0.3-0.5 s on 2 cores)"


def test_bad_config_and_stale_folder_are_refused(tmp_path: Path) -> None:
    # the config's values are refused when it is loaded (hsissl.config_rules)
    with pytest.raises(ValueError, match="synthetic.size=8; expected >= 16"):
        load_config(None, ["synthetic.size=8"])
    with pytest.raises(ValueError, match="synthetic.scenes.tr=-1; expected >= 0"):
        load_config(None, ["synthetic.scenes={tr: -1}"])
    with pytest.raises(ValueError, match="synthetic.scenes=.*; expected plain folder names"):
        load_config(None, ["synthetic.scenes={../tr: 1}"])
    with pytest.raises(ValueError, match="synthetic.unlabelled_fraction=1.0; expected"):
        load_config(None, ["synthetic.unlabelled_fraction=1.0"])
    make_synthetic(tmp_path, SyntheticConfig(scenes={"tr": 2}, size=32))
    make_synthetic(
        tmp_path, SyntheticConfig(scenes={"tr": 2}, size=32)
    )  # same config: rerun is fine
    with pytest.raises(FileExistsError, match="S0002.tif"):
        make_synthetic(tmp_path, SyntheticConfig(scenes={"tr": 1}, size=32))
