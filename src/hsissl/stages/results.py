"""What each ``hsissl.stages.<x>.run`` returns: one dataclass per stage.

``uri`` is the stage's main output in the store (what a pipeline passes on); the fields are
what the stage reports, in the order the CLI prints them (``summary()``, JSON).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar


@dataclass
class StageResult:
    """Base: ``uri`` (the field named by ``URI_FIELD``), ``to_dict()`` (every field, in order),
    ``summary()`` (what the CLI prints)."""

    URI_FIELD: ClassVar[str]  # the field holding the stage's main output

    @property
    def uri(self) -> str:
        """The stage's main output."""
        return getattr(self, self.URI_FIELD)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def summary(self) -> dict[str, Any]:
        return self.to_dict()

    def failures(self) -> list[str]:
        """Why the request is not fully met although the stage returned (the CLI exits 2)."""
        return []


@dataclass
class IngestResult(StageResult):
    dataset_uri: str
    manifest: dict[str, Any]
    reused: bool

    URI_FIELD = "dataset_uri"

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in self.to_dict().items() if k != "manifest"}  # too long to print


@dataclass
class IngestCheck(StageResult):
    """``ingest --report``: every violation found; nothing written."""

    violations: list[Any]
    source: str
    leakage: dict[str, Any]

    URI_FIELD = "source"


@dataclass
class PretrainResult(StageResult):
    encoder_uri: str
    steps: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)  # the last logged training metrics
    resumed: bool = False

    URI_FIELD = "encoder_uri"


@dataclass
class FinetuneResult(StageResult):
    name: str
    results_uri: str
    head_uri: str
    tile_miou: float | None
    scene_miou: float | None
    seconds: float

    URI_FIELD = "results_uri"


@dataclass
class BaselineResult(StageResult):
    name: str
    results_uri: str
    model_uri: str
    steps: int
    tile_miou: float | None
    scene_miou: float | None
    seconds: float

    URI_FIELD = "results_uri"


@dataclass
class PCAResult(StageResult):
    results: str
    explained_variance: list[float]  # per component
    mean_mse: dict[str, float]  # per reconstruction

    URI_FIELD = "results"


@dataclass
class ReportResult(StageResult):
    html_uri: str
    markdown_uri: str
    runs: list[str]
    encoders: list[str]
    sections: dict[str, str]
    mismatches: list[str]
    problems: list[str]
    seconds: float

    URI_FIELD = "html_uri"

    def failures(self) -> list[str]:
        return self.problems  # written anyway (the pipeline's exit task), incomplete all the same


@dataclass
class EvaluateRealResult(StageResult):
    results: str
    table: str
    tables: str

    URI_FIELD = "results"


@dataclass
class ConvertResult(StageResult):
    dst: str
    split: str
    scenes: dict[str, dict[str, Any]]
    next: str

    URI_FIELD = "dst"


@dataclass
class SyntheticResult(StageResult):
    synthetic: str
    scenes: dict[str, Any]
    size: int

    URI_FIELD = "synthetic"
