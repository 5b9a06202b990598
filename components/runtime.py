"""What every component does inside its pod: config, lineage, the stage call, artifact pointers.

This module never imports kfp or kubernetes: it runs in the stage images and under
``kfp.local``, and each component's body is a few lines calling one function here. Artifacts
are pointers: their metadata (and a small JSON file at ``artifact.path``) hold the
object-store URI of the real data, which stays in the artifact store.

Config for a stage = preset <- the pipeline's ``overrides`` <- the wiring the pipeline owns
(``hsissl.presets``); lineage (the MLflow parent run) is ``hsissl.tracking_lineage``.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from hsissl import tracking_lineage as lineage
from hsissl.layout import METRICS, split_dataset_uri
from hsissl.presets import stage_config
from hsissl.stages.results import StageResult

log = logging.getLogger("hsissl.components")

POINTER_FILE_LIMIT = 4096  # a pointer file larger than this is not a pointer


def setup_logging() -> None:
    """INFO logs of the library in the pod log (only inside a KFP component process)."""
    if os.environ.get("_KFP_RUNTIME"):  # set by the KFP component command
        logging.basicConfig(level=logging.INFO, force=True,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip


def dataset_wiring(dataset_uri: str) -> dict[str, str]:
    """``<root>/datasets/<name>`` -> storage root and dataset name, so a stage reads exactly it."""
    root, name = split_dataset_uri(dataset_uri)
    return {"storage.uri": root, "data.name": name}


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


# -- artifacts ----------------------------------------------------------------------------


def uri_of(artifact: Any) -> str:
    """The object-store URI an input artifact points to (metadata, else its pointer file)."""
    uri = (artifact.metadata or {}).get("uri")
    path = Path(artifact.path) if getattr(artifact, "path", None) else None
    if not uri and path is not None and path.is_file() and path.stat().st_size < POINTER_FILE_LIMIT:
        uri = json.loads(path.read_text()).get("uri")
    if not uri:
        raise ValueError(
            f"input artifact {artifact.name!r} ({artifact.uri}) points nowhere: expected "
            "metadata['uri'] or a JSON pointer file with a 'uri' key"
        )
    return uri


def scalars(values: dict[str, Any], prefix: str = "") -> dict[str, float | str]:
    """Flat ``{"a.b": 1.0}`` of the numbers and short strings in ``values`` (for metadata)."""
    out: dict[str, float | str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(scalars(value, prefix=f"{name}."))
        elif isinstance(value, bool):
            out[name] = str(value).lower()
        elif isinstance(value, int | float):
            out[name] = float(value)
        elif isinstance(value, str) and len(value) <= 500:
            out[name] = value
    return out


def publish(artifact: Any, uri: str, summary: dict[str, Any] | None = None) -> None:
    """Make ``artifact`` point at ``uri`` (metadata + a small JSON pointer file)."""
    info = {"uri": uri, **scalars(summary or {})}
    artifact.metadata.update(info)
    path = Path(artifact.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=1))


def log_metrics(metrics: Any, values: dict[str, Any]) -> None:
    """Numeric entries of ``values`` (flattened) on a KFP Metrics artifact, also as a JSON file
    at its path (a Metrics artifact without a file counts as missing in kfp.local's cache)."""
    for key, value in scalars(values).items():
        if isinstance(value, float):
            metrics.log_metric(key, value)
    path = Path(metrics.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(metrics.metadata), indent=1))


def log_confusion(confusion: Any, results_uri: str) -> None:
    """The whole-scene confusion matrix of a finetune or baseline result (its
    ``metrics.json``) on a KFP ``ClassificationMetrics`` artifact, which the run page draws:
    the WHU-OHS classes by name, rows = ground truth, columns = prediction, in pixels. The
    ``unlabelled`` id 0 is left out (its pixels are not scored)."""
    from hsissl.data.ohs import CLASS_NAMES

    metrics = json.loads(fetch(f"{results_uri.rstrip('/')}/{METRICS}"))
    matrix = metrics["scene"]["matrix"]
    ids = range(1, len(matrix))
    names = [CLASS_NAMES[i] if i < len(CLASS_NAMES) else f"class {i}" for i in ids]
    confusion.log_confusion_matrix(names, [[int(matrix[t][p]) for p in ids] for t in ids])
    path = Path(confusion.path)  # a file, as for Metrics (kfp.local's cache wants one)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(confusion.metadata)))


def fetch(uri: str) -> bytes:
    """Bytes of the object at ``uri`` (file path, file:// or s3://)."""
    from hsissl.storage import open_storage

    parent, _, name = uri.rstrip("/").rpartition("/")
    return open_storage(parent).get_bytes(name)


# -- stages -------------------------------------------------------------------------------


def call_stage(module: str, cfg, kfp_run_id: str = "") -> StageResult:
    """``hsissl.stages.<module>.run(cfg)`` nested under the pipeline's MLflow parent run."""
    lineage.join_parent_run(cfg, kfp_run_id)
    return importlib.import_module(f"hsissl.stages.{module}").run(cfg)


def pretrain(method: str, dataset: Any, preset: str, overrides: list[str], tracking_uri: str,
             epochs: float, max_steps: int, kfp_run_id: str, encoder: Any,
             metrics: Any) -> StageResult:  # fmt: skip
    """Pretrain ``method`` (mae | dinov2 | ssvit); with several GPUs in the pod, under torchrun."""
    from components import torchrun
    from components.pretrain_task import pretrain_config, publish_pretrain

    setup_logging()
    cfg, wiring = pretrain_config(method, dataset, preset, overrides, tracking_uri, epochs,
                                  max_steps, kfp_run_id)  # fmt: skip
    procs = torchrun.processes_per_pod()
    if procs > 1:
        lineage.join_parent_run(cfg, kfp_run_id)  # the env reaches rank 0's tracked run
        result = torchrun.pretrain(f"pretrain-{method}", preset, overrides, wiring, procs, cfg)
    else:
        result = call_stage(f"pretrain_{method}", cfg, kfp_run_id)
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
