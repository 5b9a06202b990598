"""What every component does inside its pod: config, lineage, the stage call, its outputs.

This module never imports kfp or kubernetes: it runs in the stage images and under
``kfp.local``, and each component's body is a few lines calling one function here (or in a
``components/*_task.py`` beside it). Artifacts are pointers (``components.artifacts``).

Config for a stage = preset <- the pipeline's ``overrides`` <- the wiring the pipeline owns
(``hsissl.presets``); lineage (the MLflow parent run) is ``hsissl.tracking_lineage``.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Any

from components import torchrun
from components.artifacts import log_confusion, log_metrics, publish, uri_of
from components.pretrain_task import pretrain_config, publish_pretrain
from hsissl import tracking_lineage as lineage
from hsissl.presets import dataset_wiring, stage_config
from hsissl.stages.results import StageResult

log = logging.getLogger("hsissl.components")


def setup_logging() -> None:
    """INFO logs of the library in the pod log (only inside a KFP component process)."""
    if os.environ.get("_KFP_RUNTIME"):  # set by the KFP component command
        logging.basicConfig(level=logging.INFO, force=True,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip


# -- lineage (one MLflow parent run per pipeline run) -------------------------------------


def open_lineage(preset: str, overrides: list[str], tracking_uri: str, kfp_run_id: str,
                 pipeline: str, params: dict[str, Any]) -> str:  # fmt: skip
    """Create (or find, when retried) the parent run; returns its id."""
    setup_logging()
    cfg = stage_config(preset, overrides, {"tracking.uri": tracking_uri})
    return lineage.open_parent_run(cfg, kfp_run_id, pipeline, params)


def close_lineage(preset: str, overrides: list[str], tracking_uri: str, kfp_run_id: str,
                  state: str) -> str | None:  # fmt: skip
    """End the parent run as the pipeline's final ``state`` says; returns its id."""
    cfg = stage_config(preset, overrides, {"tracking.uri": tracking_uri})
    return lineage.close_parent_run(cfg, kfp_run_id, state)


# -- stages -------------------------------------------------------------------------------


def call_stage(module: str, cfg, kfp_run_id: str = "", **kwargs: Any) -> StageResult:
    """``hsissl.stages.<module>.run(cfg, **kwargs)`` nested under the pipeline's MLflow parent run."""
    lineage.join_parent_run(cfg, kfp_run_id)
    return importlib.import_module(f"hsissl.stages.{module}").run(cfg, **kwargs)


def pretrain(method: str, dataset: Any, preset: str, overrides: list[str], tracking_uri: str,
             epochs: float, max_steps: int, kfp_run_id: str, encoder: Any,
             metrics: Any) -> StageResult:  # fmt: skip
    """Pretrain ``method`` (hsissl.methods); with several GPUs in the pod, under torchrun."""
    setup_logging()
    cfg, wiring = pretrain_config(method, dataset, preset, overrides, tracking_uri, epochs,
                                  max_steps, kfp_run_id)  # fmt: skip
    procs = torchrun.processes_per_pod()
    if procs > 1:
        lineage.join_parent_run(cfg, kfp_run_id)  # the env reaches rank 0's tracked run
        result = torchrun.pretrain(f"pretrain-{method}", preset, overrides, wiring, procs, cfg)
    else:
        result = call_stage("pretrain", cfg, kfp_run_id, method=method)
    publish_pretrain(method, result, encoder, metrics)
    return result


def finetune(dataset: Any, encoder: Any, head: str, preset: str, overrides: list[str],
             tracking_uri: str, model: Any, metrics: Any,
             confusion: Any = None) -> StageResult:  # fmt: skip
    """One head on one frozen encoder (or on a random-init one: ``random:<factory>``);
    ``confusion``: a ClassificationMetrics artifact for the whole-scene confusion matrix."""
    setup_logging()
    cfg = stage_config(preset, overrides, {**dataset_wiring(uri_of(dataset)),
                                           "tracking.uri": tracking_uri,
                                           "finetune.encoder": uri_of(encoder),
                                           "finetune.head": head})  # fmt: skip
    result = call_stage("finetune", cfg)
    publish(model, result.uri, {"head": cfg.finetune.head, "encoder": cfg.finetune.encoder,
                                "name": result.name})  # fmt: skip
    log_metrics(metrics, result.to_dict())
    if confusion is not None:
        log_confusion(confusion, result.uri)
    return result


def evaluate(module: str, stage: str, dataset: Any, preset: str, overrides: list[str],
             tracking_uri: str, model: Any, metrics: Any,
             confusion: Any = None) -> StageResult:  # fmt: skip
    """A stage that reads the dataset and writes results: baseline, pca_poc (``confusion``:
    see :func:`finetune`); ``stage`` names the task in messages."""
    setup_logging()
    cfg = stage_config(preset, overrides, {**dataset_wiring(uri_of(dataset)),
                                           "tracking.uri": tracking_uri})  # fmt: skip
    result = call_stage(module, cfg)
    log.info("%s: %s", stage, result.uri)
    publish(model, result.uri)
    log_metrics(metrics, result.to_dict())
    if confusion is not None:
        log_confusion(confusion, result.uri)
    return result
