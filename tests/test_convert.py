"""``hsissl convert``: ENVI, GeoTIFF and .mat/.npy + sidecar -> WHU-OHS layout (hsissl.data.convert).

ENVI files are written here byte by byte (header + raw binary) and read back through GDAL's ENVI
driver (rasterio 1.4.4 / GDAL 3.10.3), so interleave, byte order, header offset, map info and
the header's spectral fields are exercised as a user's file would be.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import scipy.io
from rasterio.transform import Affine

from hsissl import cli
from hsissl.data.convert import Options, convert_path, convert_source
from hsissl.data.ohs import BAND_CENTRES_NM, NUM_BANDS
from hsissl.data.resample import ConvertError
from hsissl.storage import open_storage

CENTRES = np.asarray(BAND_CENTRES_NM, dtype=np.float64)
UTM50N_WKT = (
    'PROJCS["WGS_1984_UTM_Zone_50N",GEOGCS["GCS_WGS_1984",DATUM["D_WGS_1984",SPHEROID['
    '"WGS_1984",6378137.0,298.257223563]],PRIMEM["Greenwich",0.0],UNIT["Degree",'
    '0.0174532925199433]],PROJECTION["Transverse_Mercator"],PARAMETER["False_Easting",500000.0],'
    'PARAMETER["False_Northing",0.0],PARAMETER["Central_Meridian",117.0],PARAMETER['
    '"Scale_Factor",0.9996],PARAMETER["Latitude_Of_Origin",0.0],UNIT["Meter",1.0]]'
)
ENVI_TYPES = {"uint8": 1, "int16": 2, "int32": 3, "float32": 4, "float64": 5, "uint16": 12}


def write_envi(path: Path, cube_bhw: np.ndarray, interleave: str = "bsq", big_endian: bool = False,
               offset: int = 0, **fields: str) -> Path:  # fmt: skip
    """Raw ENVI: ``path`` (.hdr) + ``path.with_suffix('.img')``; extra header ``fields`` as given."""
    b, h, w = cube_bhw.shape
    order = {"bsq": (0, 1, 2), "bil": (1, 0, 2), "bip": (1, 2, 0)}[interleave]
    data = cube_bhw.transpose(order).astype(cube_bhw.dtype.newbyteorder(">" if big_endian else "<"))
    path.with_suffix(".img").write_bytes(b"\xab" * offset + data.tobytes())
    lines = ["ENVI", f"samples = {w}", f"lines = {h}", f"bands = {b}", f"header offset = {offset}",
             "file type = ENVI Standard", f"data type = {ENVI_TYPES[cube_bhw.dtype.name]}",
             f"interleave = {interleave}", f"byte order = {int(big_endian)}"]  # fmt: skip
    lines += [f"{k.replace('_', ' ')} = {v}" for k, v in fields.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def braces(values) -> str:
    return "{" + ", ".join(f"{v:g}" for v in values) + "}"


def linear_cube(wl_nm: np.ndarray, h: int, w: int, dtype: str, rng) -> tuple[np.ndarray, ...]:
    """(B, H, W) cube whose every spectrum is a + b * wavelength (exactly representable)."""
    a = rng.integers(100, 2000, (h, w)).astype(np.float64)
    b = rng.integers(0, 3, (h, w)).astype(np.float64)
    cube = a[None] + b[None] * wl_nm[:, None, None]
    return cube.astype(dtype), a, b


# ---------------------------------------------------------------- ENVI


@pytest.mark.parametrize("interleave", ["bsq", "bil", "bip"])
@pytest.mark.parametrize(("dtype", "big_endian"), [("int16", True), ("float32", False), ("uint16", False)])  # fmt: skip
def test_envi_any_interleave_type_and_byte_order(tmp_path, interleave, dtype, big_endian):
    rng = np.random.default_rng(0)
    wl_um = np.round(np.arange(0.40, 1.0001, 0.005), 4)  # 121 bands, micrometres
    cube, a, b = linear_cube(wl_um * 1000, 5, 6, dtype, rng)
    bbl = np.ones(wl_um.size, dtype=int)
    bbl[[10, 60]] = 0
    cube[10] = cube[60] = 999  # garbage in the bad bands: must be dropped, not resampled
    cube[:, 0, 0] = -9 if dtype != "uint16" else 9  # a nodata pixel
    hdr = write_envi(
        tmp_path / "scene.hdr", cube, interleave, big_endian, offset=64,
        wavelength_units="Micrometers", wavelength=braces(wl_um), fwhm=braces(np.full(121, 0.006)),
        bbl=braces(bbl), data_ignore_value="-9" if dtype != "uint16" else "9",
        reflectance_scale_factor="5000",
        map_info="{UTM, 1, 1, 500000, 3400000, 30, 30, 50, North, WGS-84, units=Meters}",
        coordinate_system_string="{" + UTM50N_WKT + "}",
    )  # fmt: skip
    records = convert_path(hdr, tmp_path / "out", split="va")
    out = tmp_path / "out" / "va"
    with rasterio.open(out / "image" / "scene.tif") as f:
        image, transform, crs = f.read(), f.transform, f.crs
    assert image.shape == (NUM_BANDS, 5, 6) and image.dtype == np.int16
    assert transform == Affine(30, 0, 500000, 0, -30, 3400000) and crs.to_epsg() == 32650
    # Gaussian SRFs keep a linear spectrum linear; scale = 10000 / reflectance scale factor.
    expect = np.rint((a[None] + b[None] * CENTRES[:, None, None]) * 2.0)
    expect[:, 0, 0] = 0  # nodata pixel: filled with 0 and unlabelled
    np.testing.assert_array_equal(image, expect)
    record = json.loads((out / "meta" / "scene.json").read_text())
    assert record == records[0]
    assert record["resampling"]["method"] == "gaussian-srf"
    assert record["bad_bands_dropped"] == [11, 61] and record["bands_used"] == 119
    assert record["scale"] == {"value": 2.0, "from": "ENVI header reflectance scale factor 5000"}
    assert record["nodata"]["pixels_filled"] == 1
    assert record["georeference"]["crs"] == "EPSG:32650"
    assert "Micrometers" in record["wavelengths_nm"]["from"]


def test_envi_without_fwhm_falls_back_to_linear_and_says_so(tmp_path):
    wl = np.arange(450.0, 960.0, 10.0)
    cube, a, b = linear_cube(wl, 3, 4, "int16", np.random.default_rng(1))
    hdr = write_envi(tmp_path / "s.hdr", cube, wavelength_units="nm", wavelength=braces(wl))
    conv = convert_source(hdr)
    assert conv.record["resampling"]["method"] == "linear"
    assert conv.record["resampling"]["notes"] == ["linear interpolation of band centres (band widths unknown)"]  # fmt: skip
    assert conv.transform is None and conv.record["georeference"] is None
    assert conv.record["scale"]["from"].startswith("assumed: integer data")
    np.testing.assert_array_equal(conv.image, np.rint(a[None] + b[None] * CENTRES[:, None, None]))


def _envi(tmp_path: Path, bands: int = 40, **fields: str) -> Path:
    cube = np.ones((bands, 4, 4), dtype=np.int16)
    return write_envi(tmp_path / "bad.hdr", cube, **fields)


def test_envi_errors_name_the_file_and_field(tmp_path):
    wl = np.linspace(450, 950, 40)
    with pytest.raises(ConvertError, match=r"bad.hdr: wavelength: none in the file and no sidecar"):
        convert_source(_envi(tmp_path))
    with pytest.raises(ConvertError, match=r"bad.hdr: wavelength units: found 'Wavenumber'"):
        convert_source(_envi(tmp_path, wavelength=braces(wl), wavelength_units="Wavenumber"))
    with pytest.raises(ConvertError, match=r"bad.hdr: wavelength units: found None"):
        convert_source(_envi(tmp_path, wavelength=braces(wl)))
    shuffled = wl.copy()
    shuffled[[5, 6]] = shuffled[[6, 5]]
    with pytest.raises(
        ConvertError, match=r"bad.hdr: wavelengths: not strictly increasing \(band 6"
    ):
        convert_source(_envi(tmp_path, wavelength=braces(shuffled), wavelength_units="nm"))
    with pytest.raises(ConvertError, match=r"bad.hdr: band count: the cube has 40 bands but 39 wavelengths"):  # fmt: skip
        convert_source(_envi(tmp_path, wavelength=braces(wl[:-1]), wavelength_units="nm"))
    with pytest.raises(ConvertError, match=r"fwhm: found 3 values, expected 1 or 40"):
        convert_source(_envi(tmp_path, wavelength=braces(wl), wavelength_units="nm", fwhm="{1, 2, 3}"))  # fmt: skip


def test_too_few_ohs_bands_covered_is_refused_unless_told(tmp_path):
    wl = np.linspace(500, 850, 36)  # misses 466, 480 below and 866-940 above: 7 bands
    hdr = _envi(tmp_path, 36, wavelength=braces(wl), wavelength_units="nm")
    with pytest.raises(ConvertError) as info:
        convert_path(hdr, tmp_path / "out")
    assert str(info.value) == (
        f"{hdr}: wavelength coverage: 500-850 nm leaves OHS bands [466, 480, 866, 880, 896, 910, "
        "926, 940] nm (8 of 32) to be extrapolated from the edge band; at most 2 allowed (set "
        "max_extrapolated in the sidecar or convert.max_extrapolated=N to accept)"
    )
    assert not (tmp_path / "out").exists()
    records = convert_path(hdr, tmp_path / "out", options=Options(max_extrapolated=8))
    assert records[0]["resampling"]["extrapolated_ohs_nm"] == [466, 480, 866, 880, 896, 910, 926, 940]  # fmt: skip


# ---------------------------------------------------------------- labels


def test_label_raster_must_match_the_image_size_and_grid(tmp_path):
    wl = np.linspace(450, 950, 40)
    geo = {"wavelength": braces(wl), "wavelength_units": "nm",
           "map_info": "{UTM, 1, 1, 500000, 3400000, 30, 30, 50, North, WGS-84, units=Meters}"}  # fmt: skip
    hdr = _envi(tmp_path, **geo)

    def label_file(name: str, shape, transform) -> Path:
        path = tmp_path / name
        with rasterio.open(path, "w", driver="GTiff", count=1, height=shape[0], width=shape[1],
                           dtype="uint8", crs="EPSG:32650", transform=transform) as f:  # fmt: skip
            f.write(np.full((1, *shape), 3, dtype=np.uint8))
        return path

    good = label_file("good.tif", (4, 4), Affine(30, 0, 500000, 0, -30, 3400000))
    conv = convert_source(hdr, options=Options(label=good))
    assert conv.record["label"]["rule"] == "as_is" and (conv.label == 3).all()
    small = label_file("small.tif", (3, 4), Affine(30, 0, 500000, 0, -30, 3400000))
    with pytest.raises(ConvertError, match=r"small.tif: label size: found 3x4, expected 4x4"):
        convert_source(hdr, options=Options(label=small))
    shifted = label_file("shifted.tif", (4, 4), Affine(30, 0, 500030, 0, -30, 3400000))
    with pytest.raises(ConvertError, match=r"shifted.tif: label grid: found EPSG:32650 \(30.0, 0.0, 500030.0"):  # fmt: skip
        convert_source(hdr, options=Options(label=shifted))


def test_finer_label_raster_must_sit_on_the_image_grid(tmp_path):
    """rule majority: a label raster on a 2x finer grid, aligned with the image's map info."""
    wl = np.linspace(450, 950, 40)
    _envi(tmp_path, wavelength=braces(wl), wavelength_units="nm",
          map_info="{UTM, 1, 1, 500000, 3400000, 30, 30, 50, North, WGS-84, units=Meters}")  # fmt: skip
    fine = np.kron(np.array([[1, 2], [3, 4]], dtype=np.uint8), np.ones((4, 4), np.uint8))  # (8, 8)
    for name, x0 in (("fine.tif", 500000), ("fine_shifted.tif", 500015)):
        with rasterio.open(tmp_path / name, "w", driver="GTiff", count=1, height=8, width=8, dtype="uint8",
                           crs="EPSG:32650", transform=Affine(15, 0, x0, 0, -15, 3400000)) as f:  # fmt: skip
            f.write(fine[None])
    (tmp_path / "bad.yaml").write_text("label: {file: fine.tif, rule: majority}\n")
    (record,) = convert_path(tmp_path / "bad.hdr", tmp_path / "out")
    assert record["label"]["rule"] == "majority" and record["label"]["pixels"] == {"1": 4, "2": 4, "3": 4, "4": 4}  # fmt: skip
    (tmp_path / "bad.yaml").write_text("label: {file: fine_shifted.tif, rule: majority}\n")
    with pytest.raises(ConvertError, match=r"fine_shifted.tif: label grid: found EPSG:32650 \(15.0, 0.0, 500015.0"):  # fmt: skip
        convert_path(tmp_path / "bad.hdr", tmp_path / "out")


def _mat_scene(tmp_path: Path, sidecar: str, **arrays) -> Path:
    scipy.io.savemat(tmp_path / "cube.mat", arrays)
    path = tmp_path / "cube.yaml"
    path.write_text(sidecar)
    return path


GRID = (
    "wavelengths: {units: nm, grid: {start: 400, stop: 1000, count: 64, removed: [1-2, 63-64]}}\n"
)


@pytest.mark.parametrize(
    ("rule", "label", "expected"),
    [
        ("as_is", np.array([[1, 2], [3, 4]], dtype=np.uint8), [[1, 2], [3, 4]]),
        ("majority", np.array([[5, 5, 1, 0], [5, 0, 0, 0]], dtype=np.uint8).repeat(2, 0), [[5, 0]]),
        ("abundance_argmax", np.dstack([np.eye(2), 1 - np.eye(2), np.zeros((2, 2))]), [[1, 2], [2, 1]]),
        ("none", None, [[0, 0], [0, 0]]),
    ],
)  # fmt: skip
def test_mat_sidecar_label_rules(tmp_path, rule, label, expected):
    hw = (1, 2) if rule == "majority" else (2, 2)
    arrays = {"x": np.random.default_rng(3).uniform(0, 1, (*hw, 60))}
    label_key = ""
    if label is not None:
        arrays["gt"] = label
        label_key = "label: {var: gt, rule: " + rule + "}\n"
    sidecar = _mat_scene(tmp_path, "file: cube.mat\ncube: x\n" + label_key + GRID, **arrays)
    records = convert_path(sidecar, tmp_path / "out")
    with rasterio.open(tmp_path / "out" / "tr" / "label" / "cube.tif") as f:
        assert f.read(1).tolist() == expected
    assert records[0]["label"]["rule"] == rule
    assert records[0]["scale"]["from"].startswith("assumed: float data")  # 0-1 -> x 10000


def test_npy_with_bhw_layout_fwhm_scale_and_nodata(tmp_path):
    wl = np.linspace(420, 980, 57)
    cube, a, b = linear_cube(wl, 3, 3, "float64", np.random.default_rng(5))
    cube[:, 2, 2] = -1.0
    np.save(tmp_path / "c.npy", cube)
    (tmp_path / "c.yaml").write_text(
        "layout: BHW\nwavelengths: {units: nm, values: [" + ", ".join(f"{v:g}" for v in wl) + "]}\n"
        "fwhm: 12\nscale: 2\nnodata: -1\nsensor: lab\n"
    )
    (record,) = convert_path(tmp_path / "c.npy", tmp_path / "out")
    assert record["resampling"]["method"] == "gaussian-srf" and record["fwhm_nm"] == {"min": 12.0, "max": 12.0}  # fmt: skip
    assert record["nodata"]["pixels_filled"] == 1 and record["sensor"] == "lab"
    with rasterio.open(tmp_path / "out" / "tr" / "image" / "c.tif") as f:
        expect = np.rint((a[None] + b[None] * CENTRES[:, None, None]) * 2)
        expect[:, 2, 2] = 0
        np.testing.assert_array_equal(f.read(), expect)


def test_sidecar_errors_name_the_file_and_field(tmp_path):
    cube = np.zeros((2, 2, 60))
    cases = [
        ("file: cube.mat\ncube: x\n", "cube.mat: wavelength: none in the file and no sidecar"),
        ("file: cube.mat\ncube: x\ncolour: red\n" + GRID, r"cube.yaml: unknown keys \['colour'\]"),
        (
            "file: cube.mat\ncube: x\nlabel: {var: gt, rule: vote}\n" + GRID,
            "cube.yaml: label.rule: found 'vote'",
        ),  # fmt: skip
        ("file: cube.mat\ncube: y\n" + GRID, r"cube.mat: cube: no variable 'y'; found \['x'\]"),
        (
            "file: cube.mat\ncube: x\nwavelengths: {units: furlong, values: [1, 2]}\n",
            "cube.yaml: wavelengths.units: found 'furlong'",
        ),  # fmt: skip
        (
            "file: cube.mat\ncube: x\nwavelengths: {units: nm, values: [500, 600, 550]}\n",
            "cube.yaml: wavelengths: not strictly increasing",
        ),  # fmt: skip
        (
            "file: cube.mat\ncube: x\nwavelengths: {units: nm, grid: {start: 400, stop: 900, count: 60, removed: [61]}}\n",
            r"wavelengths.grid.removed: bands \[61\] beyond",
        ),  # fmt: skip
        ("file: other.mat\ncube: x\n" + GRID, "other.mat: source file: not found"),
    ]
    for text, message in cases:
        sidecar = _mat_scene(tmp_path, text, x=cube)
        with pytest.raises(ConvertError, match=message):
            convert_path(sidecar, tmp_path / "out")
    scipy.io.savemat(tmp_path / "lonely.mat", {"x": cube})
    with pytest.raises(
        ConvertError, match=r"lonely.mat: sidecar: none found, expected .*lonely.yaml"
    ):
        convert_path(tmp_path / "lonely.mat", tmp_path / "out")


# ---------------------------------------------------------------- GeoTIFF sources


def _geotiff(path: Path, cube_bhw: np.ndarray, band_tags=None, descriptions=None, **dataset_tags):
    b, h, w = cube_bhw.shape
    with rasterio.open(path, "w", driver="GTiff", count=b, height=h, width=w, dtype=cube_bhw.dtype,
                       crs="EPSG:32633", transform=Affine(5, 0, 1000, 0, -5, 2000)) as f:  # fmt: skip
        f.write(cube_bhw)
        for i in range(b):
            if band_tags:
                f.update_tags(i + 1, **band_tags(i))
            if descriptions:
                f.set_band_description(i + 1, descriptions(i))
        if dataset_tags:
            f.update_tags(**dataset_tags)
    return path


@pytest.mark.parametrize("style", ["band tags", "descriptions", "dataset tags"])
def test_geotiff_with_per_band_wavelengths(tmp_path, style):
    wl = np.arange(405.0, 1005.0, 10.0)  # 60 bands, wide enough that no SRF reaches an edge
    cube, a, b = linear_cube(wl, 4, 3, "uint16", np.random.default_rng(6))
    kwargs = {
        "band tags": {"band_tags": lambda i: {"wavelength": f"{wl[i] / 1000:g}", "wavelength_units": "micrometers",
                                              "fwhm": "0.01"}},
        "descriptions": {"descriptions": lambda i: f"Band {i + 1} ({wl[i]:g} nm)"},
        "dataset tags": {"wavelength": braces(wl), "wavelength_units": "Nanometers"},
    }[style]  # fmt: skip
    path = _geotiff(tmp_path / "g.tif", cube, **kwargs)
    (record,) = convert_path(path, tmp_path / "out", split="ts")
    assert record["resampling"]["method"] == ("gaussian-srf" if style == "band tags" else "linear")
    with rasterio.open(tmp_path / "out" / "ts" / "image" / "g.tif") as f:
        assert f.crs.to_epsg() == 32633 and f.transform == Affine(5, 0, 1000, 0, -5, 2000)
        np.testing.assert_array_equal(f.read(), np.rint(a[None] + b[None] * CENTRES[:, None, None]))


def test_geotiff_without_wavelengths_takes_them_from_a_sidecar(tmp_path):
    cube = np.full((60, 2, 2), 700, dtype=np.int16)
    path = _geotiff(tmp_path / "plain.tif", cube)
    with pytest.raises(ConvertError, match="plain.tif: wavelength: none in the file"):
        convert_path(path, tmp_path / "out")
    (tmp_path / "plain.yaml").write_text(GRID)
    (record,) = convert_path(path, tmp_path / "out")
    assert record["wavelengths_nm"]["from"].startswith(f"sidecar {tmp_path / 'plain.yaml'}")


# ---------------------------------------------------------------- folders and the CLI


def test_a_failed_folder_conversion_leaves_nothing(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    wl = np.linspace(450, 950, 40)
    write_envi(src / "a.hdr", np.ones((40, 4, 4), np.int16), wavelength=braces(wl), wavelength_units="nm")  # fmt: skip
    write_envi(src / "b.hdr", np.ones((40, 4, 4), np.int16), wavelength=braces(wl[::-1]), wavelength_units="nm")  # fmt: skip
    with pytest.raises(ConvertError, match="b.hdr: wavelengths: not strictly increasing"):
        convert_path(src, out)
    assert not out.exists()  # a.hdr converted fine, but nothing of it was moved into place
    convert_path(src / "a.hdr", out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(ConvertError):
        convert_path(src, out)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # earlier output kept


def test_cli_convert_then_ingest(tmp_path, capsys):
    """The two-command route: hsissl convert, then hsissl ingest on its output."""
    wl = np.arange(0.45, 0.96, 0.01)
    cube, _, _ = linear_cube(wl * 1000, 70, 70, "int16", np.random.default_rng(7))
    hdr = write_envi(tmp_path / "mine.hdr", cube, "bip", wavelength=braces(wl),
                     wavelength_units="um", fwhm=braces(np.full(wl.size, 0.012)))  # fmt: skip
    labels = tmp_path / "mine_gt.npy"
    np.save(labels, np.random.default_rng(8).integers(0, 5, (70, 70)).astype(np.uint8))
    out = tmp_path / "converted"
    assert cli.main(["convert", "--src", str(hdr), "--dst", str(out), "--label", str(labels)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["scenes"]["mine"]["resampling"] == "gaussian-srf"
    run = ["ingest", f"run_dir={tmp_path / 'run'}", f"data.source={out}", "data.scene_size=null",
           "data.splits=[tr]", "data.tile_size=32", "data.stride=32", "tracking.uri="]  # fmt: skip
    assert cli.main(run) == 0
    store = open_storage(tmp_path / "run" / "artifacts")  # a commit: read through its pointer
    manifest = json.loads(store.get_bytes("datasets/whu-ohs/manifest.json"))
    assert (
        manifest["splits"]["tr"]["tiles"] == 9
    )  # 70 px: 3 x 3 tiles of 32 (last ones edge-aligned)
    assert manifest["conversion"]["tr"]["mine"]["resampling"]["method"] == "gaussian-srf"


def test_cli_convert_errors_exit_2(tmp_path, capsys):
    assert cli.main(["convert", "--dst", str(tmp_path)]) == 2
    assert "convert.src and convert.dst are required" in capsys.readouterr().err
    bad = _envi(tmp_path)
    assert cli.main(["convert", "--src", str(bad), "--dst", str(tmp_path / "o")]) == 2
    assert f"{bad}: wavelength: none in the file" in capsys.readouterr().err
