"""Lineage: one MLflow parent run per pipeline run, every stage run of it nested under it.

The pipeline opens the parent run (tagged with the KFP run id and :data:`PIPELINE_ROLE`),
each stage joins it (finds it by the run id and points $HSISSL_PARENT_RUN_ID at it, which
:func:`hsissl.tracking.start_run` reads) and the exit task closes it with the pipeline's final
state (``hsissl.pipeline_state``). Retried tasks find the run an earlier attempt opened.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from hsissl import tracking
from hsissl.pipeline_state import pipeline_outcome
from hsissl.tracking import KFP_RUN_ENV, PARENT_RUN_ENV

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from hsissl.config import Config

log = logging.getLogger(__name__)

PIPELINE_ROLE = {"hsissl_role": "pipeline"}  # tag of the MLflow parent run of a pipeline run
PARAM_CHARS = 6000  # MLflow's limit on a param value


def pipeline_run_id(fallback: str = "") -> str:
    """This pipeline run's id: $KFP_RUN_ID (pod label or local runner), else ``fallback``."""
    return os.environ.get(KFP_RUN_ENV) or fallback


def _client(cfg: Config) -> tuple[MlflowClient, str]:
    from mlflow.tracking import MlflowClient

    uri = tracking.resolve_uri(cfg.tracking.uri, cfg.run_dir)
    client = MlflowClient(tracking_uri=uri)
    return client, tracking.experiment_id(client, cfg.tracking.experiment, uri)


def find_parent_run(cfg: Config, kfp_run_id: str) -> str | None:
    """The MLflow parent run of pipeline run ``kfp_run_id``, if one was opened."""
    client, experiment = _client(cfg)
    ((key, value),) = PIPELINE_ROLE.items()
    runs = client.search_runs(
        [experiment],
        filter_string=f"tags.kfp_run_id = '{kfp_run_id}' and tags.{key} = '{value}'",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def open_parent_run(cfg: Config, kfp_run_id: str, pipeline: str, params: dict[str, Any]) -> str:
    """Create (or find, when retried) the parent run; returns its id."""
    from mlflow.entities import Param

    kfp_run_id = pipeline_run_id(kfp_run_id)
    existing = find_parent_run(cfg, kfp_run_id)
    if existing:
        return existing
    client, experiment = _client(cfg)
    tags = {"kfp_run_id": kfp_run_id, "pipeline": pipeline, **PIPELINE_ROLE}
    sha = tracking.git_sha()
    if sha:
        tags["git_sha"] = sha
    run = client.create_run(experiment, run_name=f"{pipeline} {kfp_run_id}", tags=tags)
    client.log_batch(run.info.run_id,
                     params=[Param(k, str(v)[:PARAM_CHARS]) for k, v in params.items()])  # fmt: skip
    log.info("MLflow parent run %s for pipeline run %s", run.info.run_id, kfp_run_id)
    return run.info.run_id


def join_parent_run(cfg: Config, kfp_run_id: str = "") -> str | None:
    """Point $HSISSL_PARENT_RUN_ID at this pipeline run's parent run (found by its KFP run id)."""
    if os.environ.get(PARENT_RUN_ENV):
        return os.environ[PARENT_RUN_ENV]
    kfp_run_id = pipeline_run_id(kfp_run_id)
    if not kfp_run_id:
        log.warning(
            "no %s: this stage's MLflow run is not nested under a pipeline run", KFP_RUN_ENV
        )
        return None
    os.environ[KFP_RUN_ENV] = kfp_run_id  # hsissl.tracking tags stage runs with it
    parent = find_parent_run(cfg, kfp_run_id)
    if parent is None:
        log.warning("no MLflow parent run tagged kfp_run_id=%s; stage run not nested", kfp_run_id)
        return None
    os.environ[PARENT_RUN_ENV] = parent
    return parent


def close_parent_run(cfg: Config, kfp_run_id: str, state: str) -> str | None:
    """End the parent run as the pipeline's final ``state`` says (``hsissl.pipeline_state``:
    COMPLETE/SUCCEEDED finished, FAILED/CANCELED/SYSTEM_ERROR failed, else tagged unknown);
    returns its id."""
    parent = join_parent_run(cfg, kfp_run_id)
    if parent:
        client, _ = _client(cfg)
        outcome = pipeline_outcome(state)
        for key, value in outcome.tags(state).items():
            client.set_tag(parent, key, value)
        client.set_terminated(parent, outcome.mlflow_status)
    return parent


def tag_report_failure(cfg: Config, parent: str, error: BaseException) -> None:
    """Mark the parent run: its report failed, and why."""
    client, _ = _client(cfg)
    client.set_tag(parent, "report_state", "FAILED")
    client.set_tag(parent, "report_error", f"{type(error).__name__}: {error}"[:5000])
