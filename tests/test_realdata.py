"""Real .mat scenes -> WHU-OHS layout (hsissl.data.realdata: the catalogue of sidecar files).

Resampling and folder handling are tested on synthetic data; the `realdata` tests read the
small scenes in ../shared/data (or $HSISSL_SHARED_DATA) and skip when they are absent.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import rasterio
import scipy.io

from hsissl.data.label_rules import majority_downsample
from hsissl.data.ohs import BAND_CENTRES_NM, NUM_BANDS, NUM_CLASSES
from hsissl.data.realdata import (
    SCENES,
    convert_mat_folder,
    is_mat_folder,
    load_catalogue,
    load_scene,
)
from hsissl.data.resample import apply, extrapolated_bands, linear_weights

SHARED_DATA = Path(
    os.environ.get("HSISSL_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)
needs_data = pytest.mark.skipif(
    not (SHARED_DATA / "README.md").is_file(),
    reason=f"real scenes not found at {SHARED_DATA} (set HSISSL_SHARED_DATA to the data folder)",
)

CENTRES = np.asarray(BAND_CENTRES_NM, dtype=np.float64)  # (32,)


def resample_to_ohs(cube: np.ndarray, wl: np.ndarray) -> np.ndarray:
    return apply(cube, linear_weights(wl))


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
    with pytest.raises(ValueError, match="not strictly increasing"):
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
    with (
        pytest.warns(UserWarning),
        pytest.raises(ValueError, match="band count: the cube has 10 bands but 156"),
    ):
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
    raw = scipy.io.loadmat(SHARED_DATA / scene.file)[scene.cube][hw[0] // 2, hw[1] // 3]
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
    full = scipy.io.loadmat(SHARED_DATA / SCENES["houston_dataset"].file)["clasLabs"]
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


# ---------------------------------------------------------------- the catalogue


# sha256 of the converted (32, H, W) int16 image and (H, W) uint8 label bytes (C order) of every
# shared scene, captured at commit 803090d, before the scene table became sidecar files: the
# catalogue must keep giving exactly these bytes.
CHECKSUMS = {
    "Indian_subset": ("d8ef046422a3fa9d25691c297ca30fb9e35f719ebd02daaacd9dde1c821c086a",
                      "c7e4115a06cbaf414431fd7da751583444ce88d0640ab680aa683e0dcb006589"),
    "houston_dataset": ("ed8a6608746f7a2c2e35be56c99bb3f4c8e1046de401b1adff0af8e35e9dc0f8",
                        "5f48cb9b44dde885227676fd0e43104fbcf03b8b807460de42d357c3d220f33f"),
    "Samson": ("d60c3910455017318bf5a0e16c156b7411d12c1d5c4eb98fb2b75c2a5a36dba6",
               "de673c3c0140451cdc1dd47a3a97e07065d39eef8c90388506d0d6066d1a9d32"),
    "abu-beach-4": ("b919338996bc5d2edccb09cc97014c7e2588594ab9f21e93caec774aa1236963",
                    "95b532cc4381affdff0d956e12520a04129ed49d37e154228368fe5621f0b9a2"),
    "abu-urban-2": ("68ba9fccd0392c0d7b2b8932f35049574f073f0ef9f74314a838dee66a3c0657",
                    "95b532cc4381affdff0d956e12520a04129ed49d37e154228368fe5621f0b9a2"),
    "sandiego_plane": ("142c8ede21df62532a94c39b7a7e54a8835a5484f8f1a056f339d453fcca5f91",
                       "95b532cc4381affdff0d956e12520a04129ed49d37e154228368fe5621f0b9a2"),
    "HYDICE_data": ("21391594ccad776acee8ffb118df6a7b266c2dc3040f8c8067689cb81912c817",
                    "668946bab9868b28489bb906205ee1026045c8bcd3ca62a1bdf733c65491351b"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CHECKSUMS))
@pytest.mark.realdata
@needs_data
def test_catalogue_gives_the_same_bytes_as_the_old_scene_table(converted, name):
    image, label = converted[name]
    digest = (hashlib.sha256(image.tobytes()).hexdigest(),
              hashlib.sha256(label.tobytes()).hexdigest())  # fmt: skip
    assert digest == CHECKSUMS[name]


def test_catalogue_is_the_packaged_sidecar_files():
    folder = Path(SCENES["Samson"].where).parent
    assert sorted(p.stem for p in folder.glob("*.yaml")) == sorted(SCENES)
    assert SCENES["houston_dataset"].label.rule == "majority"
    assert SCENES["Samson"].max_extrapolated == 4  # told to accept its 4 extrapolated bands


def test_adding_a_scene_is_adding_one_file(tmp_path):
    """A new catalogue entry in another folder is found and converted like the shipped ones."""
    catalogue_dir, data = tmp_path / "catalogue", tmp_path / "data"
    catalogue_dir.mkdir()
    rng = np.random.default_rng(4)
    cube = rng.uniform(0, 1, (6, 7, 40))  # (H, W, B) reflectance 0-1
    gt = rng.integers(0, 4, (6, 7)).astype(np.uint8)
    (data / "Mine").mkdir(parents=True)
    scipy.io.savemat(data / "Mine" / "mine.mat", {"cube": cube, "truth": gt})
    (catalogue_dir / "mine.yaml").write_text(
        "name: mine\nfile: Mine/mine.mat\nsensor: test\ncube: cube\n"
        "label: {var: truth, rule: as_is}\n"
        "wavelengths: {units: um, grid: {start: 0.40, stop: 1.0, count: 42, removed: [1, 42]}}\n"
        "scale: 10000\n"
    )
    catalogue = load_catalogue(catalogue_dir)
    assert list(catalogue) == ["mine"]
    assert is_mat_folder(data, catalogue) and not is_mat_folder(data)
    names = convert_mat_folder(data, tmp_path / "out", split="tr", catalogue=catalogue)
    assert names == ["mine"]
    wl = np.linspace(400, 1000, 42)[1:-1]
    with rasterio.open(tmp_path / "out" / "tr" / "image" / "mine.tif") as f:
        expect = np.rint(np.apply_along_axis(lambda s: np.interp(CENTRES, wl, s), 2, cube) * 1e4)
        np.testing.assert_array_equal(f.read(), expect.transpose(2, 0, 1))
    with rasterio.open(tmp_path / "out" / "tr" / "label" / "mine.tif") as f:
        np.testing.assert_array_equal(f.read(1), gt)
    assert (tmp_path / "out" / "tr" / "meta" / "mine.json").is_file()
