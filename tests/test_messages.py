"""What a user reads: truncated-file errors, errors beside progress bars, the end of a run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from hsissl.data.scenes import DataContractError
from hsissl.stages import ingest, report

REPO = Path(__file__).resolve().parents[1]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_truncated_tiff_names_the_band_and_block(tiny_cfg, whu_root) -> None:
    image = sorted((whu_root / "tr" / "image").glob("*.tif"))[0]
    _truncate(image)
    try:
        ingest.run(tiny_cfg)
    except DataContractError as exc:
        text = str(exc)
    else:
        raise AssertionError("a truncated TIFF was ingested")
    assert str(image) in text
    # rasterio 1.4.4 says only "Read failed. See previous exception for details."; GDAL's
    # cause names the band and the block.
    assert re.search(r"band \d+: IReadBlock failed at X offset \d+, Y offset \d+", text), text
    assert "See previous exception" not in text


def test_an_error_found_while_reading_pixels_prints_on_its_own_line(tiny_cfg, whu_root) -> None:
    _truncate(sorted((whu_root / "va" / "image").glob("*.tif"))[0])  # header fine, pixels not
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    args = ["ingest", "--config", str(REPO / "configs/tiny.yaml"), f"run_dir={tiny_cfg.run_dir}",
            f"data.source={whu_root}", "data.scene_size=128", "tracking.uri="]  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "hsissl.cli", *args], capture_output=True,
                          text=True, env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.split("\n")
    errors = [line for line in lines if "expected a readable GeoTIFF" in line]
    assert errors and all("%|" not in line and "\r" not in line for line in errors), errors
    assert any(line.startswith("hsissl ingest: error: ") for line in lines), proc.stderr[-2000:]
    assert "ingest:" in proc.stderr  # there was a progress bar, and its line was ended first
    assert (
        "GDAL signalled an error" not in proc.stderr
    )  # rasterio's INFO noise: not without --debug


def test_run_local_ends_with_a_plain_line_saying_where_the_report_is(tmp_path, capsys) -> None:
    from pipelines.cli import _print_local

    record = tmp_path / "runs" / "tiny" / "pipeline-runs" / "abc"
    html = tmp_path / "runs" / "tiny" / "report" / "report.html"
    html.parent.mkdir(parents=True)
    html.write_text("<html></html>")
    run = SimpleNamespace(run_id="abc", status="SUCCEEDED", record_dir=str(record),
                          parent_run_id=None, error="", tasks={})  # fmt: skip
    assert _print_local(run) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"Done. The report is {html}: open it in a browser.", last
    run.status, run.error = "FAILED", "task ingest failed"
    assert _print_local(run) == 1
    assert "The run failed (task ingest failed)" in capsys.readouterr().out.splitlines()[-1]


def test_the_report_heading_names_the_run_not_report_twice(tiny_cfg) -> None:
    result = report.run(tiny_cfg)
    from hsissl.layout import storage_of

    page = storage_of(tiny_cfg).get_bytes("reports/report/report.html").decode()
    heading = re.search(r"<h1>(.*?)</h1>", page).group(1)
    assert heading == f"hsissl report: {Path(tiny_cfg.run_dir).name}", heading
    assert "hsissl report: report" not in page and result.html_uri
