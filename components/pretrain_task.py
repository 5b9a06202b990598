"""What a pretraining task (one pod, or the multi-node launcher) configures and publishes."""

from __future__ import annotations

from typing import Any

from components.artifacts import log_metrics, publish, uri_of
from hsissl import tracking_lineage as lineage
from hsissl.layout import checkpoint_name
from hsissl.presets import dataset_wiring, stage_config
from hsissl.stages.results import PretrainResult


def pretrain_config(method: str, dataset: Any, preset: str, overrides: list[str],
                    tracking_uri: str, epochs: float, max_steps: int,
                    kfp_run_id: str) -> tuple[Any, dict[str, Any]]:  # fmt: skip
    """The Config of pretraining ``method`` on ``dataset`` and the wiring that made it, with
    ``pretrain.name`` = this run's checkpoint folder (shared by the single pod and the
    multi-node job, so both write to ``hsissl.layout.checkpoint_name``)."""
    wiring = {**dataset_wiring(uri_of(dataset)), "tracking.uri": tracking_uri,
              "pretrain.epochs": epochs if epochs > 0 else None,
              "pretrain.max_steps": max_steps if max_steps > 0 else None}  # fmt: skip
    base = stage_config(preset, overrides, wiring)
    run_id = lineage.pipeline_run_id(kfp_run_id)
    wiring["pretrain.name"] = checkpoint_name(method, base.pretrain.name, run_id)
    return stage_config(preset, overrides, wiring), wiring


def publish_pretrain(method: str, result: PretrainResult, encoder: Any, metrics: Any) -> None:
    """The outputs of a pretraining (one pod or a multi-node job): the encoder record's URI
    with method/steps/resumed, and the final training metrics."""
    publish(encoder, result.uri, {"method": method, "steps": result.steps,
                                  "resumed": result.resumed})  # fmt: skip
    log_metrics(metrics, {"steps": result.steps, **result.metrics})
