"""``hsissl make-synthetic``: the generated WHU-OHS-layout dataset, the pipeline's default input."""

from __future__ import annotations

from typing import Any

from hsissl.config import Config
from hsissl.stages.common import ensure_synthetic, run_dir_of


def run(cfg: Config) -> dict[str, Any]:
    out = ensure_synthetic(run_dir_of(cfg) / "synthetic", cfg)
    return {"synthetic": str(out), "scenes": dict(cfg.synthetic.scenes), "size": cfg.synthetic.size}
