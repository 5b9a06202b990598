"""``hsissl make-synthetic``: the generated WHU-OHS-layout dataset, the pipeline's default input."""

from __future__ import annotations

from hsissl.config import Config
from hsissl.layout import run_dir_of
from hsissl.stages.common import ensure_synthetic
from hsissl.stages.results import SyntheticResult


def run(cfg: Config) -> SyntheticResult:
    out = ensure_synthetic(run_dir_of(cfg) / "synthetic", cfg)
    return SyntheticResult(str(out), dict(cfg.synthetic.scenes), cfg.synthetic.size)
