"""What the stages that read raw scenes share: the input to ingest (generated, S3, a folder)."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING

from hsissl.config import Config, DataConfig
from hsissl.layout import run_dir_of

if TYPE_CHECKING:
    from hsissl.data.s3_scenes import ObjectRoot

log = logging.getLogger(__name__)


GENERATED = "generated"  # data.source naming the generated dataset explicitly ("" locally too)


def prepare_source(cfg: Config) -> tuple[Path | ObjectRoot, DataConfig]:
    """The WHU-OHS-layout folder (or ``s3://bucket/prefix``) to ingest and the data settings
    that apply to it.

    "" or "generated" means the generated dataset (made once per synthetic config); an S3
    prefix is read in place (``hsissl.data.s3_scenes``); a folder of known ``.mat`` cubes is
    converted to the layout first (one ``tr`` split, any scene size).
    """
    if cfg.data.source in ("", GENERATED):
        return ensure_synthetic(run_dir_of(cfg) / "synthetic", cfg), cfg.data
    if cfg.data.source.startswith("s3://"):
        from hsissl.data.s3_scenes import ObjectRoot  # rasterio: imported where it is needed

        return ObjectRoot.parse(cfg.data.source), cfg.data
    path = Path(cfg.data.source).expanduser().resolve()
    from hsissl.data import realdata  # imported here: scipy is only needed for .mat input

    if realdata.is_mat_folder(path):
        out = run_dir_of(cfg) / "converted" / cfg.data.name
        shutil.rmtree(out, ignore_errors=True)
        names = realdata.convert_mat_folder(path, out, split="tr")
        log.info(
            "converted %d .mat scenes from %s to the WHU-OHS layout in %s", len(names), path, out
        )
        return out, replace(cfg.data, splits=["tr"], scene_size=None)
    return path, cfg.data


def ensure_synthetic(out: Path, cfg: Config) -> Path:
    """Generate the default dataset into ``out`` unless it already holds this exact config."""
    from hsissl.data.synthetic import make_synthetic

    marker = out / "synthetic.json"
    wanted = asdict(cfg.synthetic)
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    make_synthetic(tmp, cfg.synthetic)
    (tmp / "synthetic.json").write_text(json.dumps(wanted))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
