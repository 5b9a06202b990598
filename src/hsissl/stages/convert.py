"""``hsissl convert``: hyperspectral cubes of any sensor -> the WHU-OHS layout ingest reads.

ENVI, GeoTIFF (with per-band wavelengths) or .mat/.npy with a sidecar YAML; resampled to the 32
OHS bands (Gaussian SRFs when band widths are known, else linear), written as
``<dst>/<split>/{image,label}/<name>.tif`` with a ``meta/<name>.json`` of what was assumed.
Then ``hsissl ingest data.source=<dst>`` (or ``hsissl evaluate-real real.source=<dst>``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from hsissl.config import Config, ConfigError
from hsissl.data.convert import Options, convert_path
from hsissl.stages.results import ConvertResult

log = logging.getLogger(__name__)


def run(cfg: Config) -> ConvertResult:
    c = cfg.convert
    if not c.src or not c.dst:
        raise ConfigError("convert.src and convert.dst are required, e.g. hsissl convert "
                          "--src scene.hdr --dst data/mine")  # fmt: skip
    options = Options(resampling=c.resampling or None, max_extrapolated=c.max_extrapolated,
                      label=Path(c.label).expanduser() if c.label else None)  # fmt: skip
    records = convert_path(Path(c.src).expanduser(), Path(c.dst).expanduser(), c.split,
                           Path(c.sidecar).expanduser() if c.sidecar else None, options)  # fmt: skip
    for r in records:
        log.info("%s -> %s/%s/image/%s.tif (%s, %d bands used, extrapolated %s)", r["source"],
                 c.dst, c.split, r["name"], r["resampling"]["method"], r["bands_used"],
                 r["resampling"]["extrapolated_ohs_nm"] or "none")  # fmt: skip
    return ConvertResult(
        dst=str(Path(c.dst).expanduser().resolve()),
        split=c.split,
        scenes={
            r["name"]: {
                "source": r["source"],
                "resampling": r["resampling"]["method"],
                "georeferenced": r["georeference"] is not None,
            }
            for r in records
        },  # fmt: skip
        next=f"hsissl ingest data.source={c.dst} data.scene_size=null 'data.splits=[{c.split}]'",
    )
