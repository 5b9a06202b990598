"""Real .mat scenes -> WHU-OHS layout (hsissl.data.realdata).

Resampling and folder handling are tested on synthetic data; the `realdata` tests read the
small scenes in ../shared/data (or $HSISSL_SHARED_DATA) and skip when they are absent.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import rasterio
import scipy.io

from hsissl.data.ohs import BAND_CENTRES_NM, NUM_BANDS, NUM_CLASSES
from hsissl.data.realdata import (
    SCENES,
    convert_mat_folder,
    extrapolated_bands,
    is_mat_folder,
    load_scene,
    majority_downsample,
    resample_to_ohs,
)

SHARED_DATA = Path(
    os.environ.get("HSISSL_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)
needs_data = pytest.mark.skipif(
    not (SHARED_DATA / "README.md").is_file(),
    reason=f"real scenes not found at {SHARED_DATA} (set HSISSL_SHARED_DATA to the data folder)",
)

CENTRES = np.asarray(BAND_CENTRES_NM, dtype=np.float64)  # (32,)
# Documented in docs/real-data.md: (bands in file, (H, W), OHS centres filled from the edge band).
EXPECTED = {
    "Indian_subset": (200, (70, 70), []),
    "houston_dataset": (48, (128, 128), []),
    "Samson": (156, (95, 95), [896, 910, 926, 940]),
    "abu-beach-4": (102, (100, 100), [866, 880, 896, 910, 926, 940]),
    "abu-urban-2": (198, (100, 100), []),
    "sandiego_plane": (189, (100, 100), []),
    "HYDICE_data": (162, (100, 80), []),
}


# ---------------------------------------------------------------- resampling (synthetic)


def test_linear_spectrum_is_reproduced_exactly_at_ohs_centres():
    rng = np.random.default_rng(0)
    wl = np.sort(rng.uniform(400, 1000, size=60))  # (B,) irregular, covers 466-940
    offset = rng.uniform(-500, 500, size=(3, 4, 1))
    slope = rng.uniform(-5, 5, size=(3, 4, 1))
    cube = offset + slope * wl  # (3, 4, B)
    out = resample_to_ohs(cube, wl)  # (3, 4, 32)
    assert out.shape == (3, 4, NUM_BANDS) and out.dtype == np.float64
    np.testing.assert_allclose(out, offset + slope * CENTRES, rtol=0, atol=1e-9)


def test_constant_spectrum_stays_constant_including_extrapolated_centres():
    wl = np.linspace(500, 900, 41)  # leaves 466-480 and 910-940 outside
    cube = np.full((2, 2, wl.size), 1234.5)
    np.testing.assert_allclose(resample_to_ohs(cube, wl), 1234.5, rtol=0, atol=1e-9)


def test_centres_outside_the_grid_take_the_edge_band():
    wl = np.linspace(500, 900, 41)
    cube = np.random.default_rng(1).uniform(0, 1e4, size=(3, 5, wl.size))
    out = resample_to_ohs(cube, wl)
    below, above = CENTRES < 500, CENTRES > 900
    assert below.sum() == 2 and above.sum() == 3
    np.testing.assert_array_equal(out[..., below], np.repeat(cube[..., :1], 2, axis=-1))
    np.testing.assert_array_equal(out[..., above], np.repeat(cube[..., -1:], 3, axis=-1))
    assert extrapolated_bands(wl) == [466, 480, 910, 926, 940]


def test_resample_rejects_bad_grids():
    cube = np.zeros((2, 2, 3))
    with pytest.raises(ValueError, match="strictly increasing"):
        resample_to_ohs(cube, np.array([500.0, 600.0, 550.0]))
    with pytest.raises(ValueError, match=r"expected \(H, W, 4\)"):
        resample_to_ohs(cube, np.array([500.0, 600.0, 700.0, 800.0]))


def test_majority_downsample_ties_go_to_smallest_id():
    raw = np.array([[3, 3, 1, 2], [3, 0, 1, 2]], dtype=np.uint8)  # two 2x2 blocks
    assert majority_downsample(raw, (1, 2)).tolist() == [[3, 1]]  # 3 wins; 1-2 tie -> 1


def test_scene_table_matches_documented_grids():
    assert set(SCENES) == set(EXPECTED)
    for name, scene in SCENES.items():
        bands, _, extrapolated = EXPECTED[name]
        assert len(scene.wavelengths_nm) == bands, name
        assert np.all(np.diff(scene.wavelengths_nm) > 0), name
        assert extrapolated_bands(scene.wavelengths_nm) == extrapolated, name


# ---------------------------------------------------------------- folders (synthetic .mat)


def _fake_samson(path: Path, rng: np.random.Generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    abundances = rng.dirichlet([1, 1, 1], size=(6, 5))  # (6, 5, 3)
    scipy.io.savemat(path, {"SamSon": rng.uniform(0, 1, (6, 5, 156)), "A": abundances})


def test_convert_mat_folder_on_synthetic_files(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _fake_samson(src / "nested" / "Samson.mat", np.random.default_rng(2))
    scipy.io.savemat(src / "other.mat", {"x": np.zeros(3)})
    assert is_mat_folder(src)
    with pytest.warns(UserWarning, match="other.mat: not a known scene"):
        names = convert_mat_folder(src, dst, split="va")
    assert names == ["Samson"]
    image, label = load_scene(src, SCENES["Samson"])  # found by name below src
    with rasterio.open(dst / "va" / "image" / "Samson.tif") as f:
        assert (f.count, f.dtypes[0], f.shape) == (NUM_BANDS, "int16", (6, 5))
        np.testing.assert_array_equal(f.read(), image)
    with rasterio.open(dst / "va" / "label" / "Samson.tif") as f:
        np.testing.assert_array_equal(f.read(1), label)
    assert set(np.unique(label)) <= {1, 2, 3}


def test_convert_mat_folder_errors(tmp_path):
    scipy.io.savemat(tmp_path / "other.mat", {"x": np.zeros(3)})
    assert not is_mat_folder(tmp_path)
    with pytest.warns(UserWarning), pytest.raises(FileNotFoundError, match="no known .mat scene"):
        convert_mat_folder(tmp_path, tmp_path / "out")
    with pytest.raises(ValueError, match="unknown scenes"):
        convert_mat_folder(tmp_path, tmp_path / "out", names=["Pavia"])
    with pytest.raises(ValueError, match="split"):
        convert_mat_folder(tmp_path, tmp_path / "out", split="train")
    scipy.io.savemat(tmp_path / "Samson.mat", {"SamSon": np.zeros((4, 4, 10)), "A": np.zeros(1)})
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"expected \(H, W, 156\)"):
        convert_mat_folder(tmp_path, tmp_path / "out")


# ---------------------------------------------------------------- real scenes


@pytest.fixture(scope="module")
def converted() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {name: load_scene(SHARED_DATA, scene) for name, scene in SCENES.items()}


@pytest.mark.parametrize("name", list(EXPECTED))
@pytest.mark.realdata
@needs_data
def test_each_real_scene_converts(converted, name):
    image, label = converted[name]
    _, hw, _ = EXPECTED[name]
    assert image.shape == (NUM_BANDS, *hw) and image.dtype == np.int16
    assert label.shape == hw and label.dtype == np.uint8 and label.max() <= NUM_CLASSES
    # Scaled to reflectance x 10000: a plausible median, and not clipped flat.
    assert 100 < np.median(image) < 10000, np.median(image)
    assert (image == np.iinfo(np.int16).max).mean() < 0.01
    # One pixel checked against an independent np.interp of the raw spectrum.
    scene = SCENES[name]
    raw = scipy.io.loadmat(SHARED_DATA / scene.relpath)[scene.cube_var][hw[0] // 2, hw[1] // 3]
    expect = np.interp(CENTRES, scene.wavelengths_nm, raw.astype(float) * scene.scale)
    np.testing.assert_array_equal(image[:, hw[0] // 2, hw[1] // 3], np.rint(expect))


@pytest.mark.realdata
@needs_data
def test_indian_pines_class_counts_match_readme(converted):
    ids, counts = np.unique(converted["Indian_subset"][1], return_counts=True)
    assert dict(zip(ids.tolist(), counts.tolist(), strict=True)) == {
        0: 1331,
        2: 1005,
        6: 358,
        10: 732,
        11: 1474,
    }


@pytest.mark.realdata
@needs_data
def test_samson_and_abu_labels(converted):
    ids, counts = np.unique(converted["Samson"][1], return_counts=True)
    assert dict(zip(ids.tolist(), counts.tolist(), strict=True)) == {1: 3015, 2: 3666, 3: 2344}
    for name in ("abu-beach-4", "abu-urban-2", "sandiego_plane", "HYDICE_data"):
        assert not converted[name][1].any(), f"{name}: anomaly maps must become unlabelled"


@pytest.mark.realdata
@needs_data
def test_houston_labels_are_4x4_majority(converted):
    full = scipy.io.loadmat(SHARED_DATA / SCENES["houston_dataset"].relpath)["clasLabs"]
    label = converted["houston_dataset"][1]  # (128, 128)
    # Hand check on the first mixed block whose majority is not a tie.
    for (by, bx), _ in np.ndenumerate(label):
        top = Counter(full[4 * by : 4 * by + 4, 4 * bx : 4 * bx + 4].ravel().tolist()).most_common()
        if len(top) > 1 and top[0][1] > top[1][1] and top[0][0] != 0:
            assert label[by, bx] == top[0][0], (by, bx, top)
            break
    else:
        pytest.fail("no mixed 4x4 block in the Houston label map")
    np.testing.assert_array_equal(label, majority_downsample(full, (128, 128)))
    assert set(np.unique(label)) == set(range(13))


@pytest.mark.realdata
@needs_data
def test_convert_real_folder_writes_whu_ohs_layout(tmp_path, converted):
    assert is_mat_folder(SHARED_DATA)
    names = convert_mat_folder(SHARED_DATA, tmp_path, split="tr")
    assert sorted(names) == sorted(EXPECTED)
    images = sorted(p.stem for p in (tmp_path / "tr" / "image").glob("*.tif"))
    labels = sorted(p.stem for p in (tmp_path / "tr" / "label").glob("*.tif"))
    assert images == labels == sorted(EXPECTED)
    for name in names:
        with rasterio.open(tmp_path / "tr" / "image" / f"{name}.tif") as f:
            assert (f.count, f.dtypes[0]) == (NUM_BANDS, "int16")
            np.testing.assert_array_equal(f.read(), converted[name][0])
        with rasterio.open(tmp_path / "tr" / "label" / f"{name}.tif") as f:
            assert (f.count, f.dtypes[0]) == (1, "uint8")
            np.testing.assert_array_equal(f.read(1), converted[name][1])
