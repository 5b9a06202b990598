"""The pipeline's final state reaches the MLflow parent run as the KFP backend means it.

The strings are the backend's own, read from kubeflow/pipelines at tags 2.14.0-2.17.0:
``backend/src/v2/driver/resolve.go`` (TaskFinalStatus case) passes
``producer.GetExecution().GetLastKnownState().String()``: the MLMD ``Execution.State`` name of the
exit handler's DAG, which ``backend/src/v2/metadata/client.go`` (UpdateDAGExecutionsState) sets to
``COMPLETE`` or ``FAILED`` (``CANCELED`` on a cancelled run). On 2.14-2.16 that function updates
only the task's direct parent DAG, so an exit handler over nested If/ParallelFor DAGs can see
``RUNNING``; 2.17.0 propagates upward (its comment: "propagation continues upward to ancestor
DAGs"). kfp.local 2.17 (``kfp/local/orchestrator/orchestrator_utils.py``) passes ``SUCCEEDED``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from components import runtime
from hsissl.pipeline_state import pipeline_outcome
from hsissl.tracking import KFP_RUN_ENV, PARENT_RUN_ENV


@pytest.mark.parametrize(
    ("state", "outcome", "status"),
    [
        ("COMPLETE", "succeeded", "FINISHED"),  # KFP backend 2.14-2.17, success
        ("SUCCEEDED", "succeeded", "FINISHED"),  # kfp.local, task-state APIs
        ("FAILED", "failed", "FAILED"),
        ("CANCELED", "failed", "FAILED"),
        ("SYSTEM_ERROR", "failed", "FAILED"),
        ("RUNNING", "unknown", "FINISHED"),  # backends 2.14-2.16, nested DAGs in the handler
        ("UNKNOWN", "unknown", "FINISHED"),
        ("", "unknown", "FINISHED"),
        ("complete", "succeeded", "FINISHED"),
    ],
)
def test_backend_states_map_to_outcomes(state: str, outcome: str, status: str) -> None:
    result = pipeline_outcome(state)
    assert (result.name, result.mlflow_status) == (outcome, status)


@pytest.mark.parametrize(
    ("state", "outcome", "status"),
    [("COMPLETE", "succeeded", "FINISHED"), ("RUNNING", "unknown", "FINISHED"),
     ("CANCELED", "failed", "FAILED")],
)  # fmt: skip
def test_close_lineage_ends_the_parent_run_with_the_backend_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, state: str, outcome: str, status: str
) -> None:
    """The exit task's path on a cluster: open the parent, close it with the backend's string."""
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    monkeypatch.delenv(KFP_RUN_ENV, raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    overrides = [f"run_dir={tmp_path}", "tracking.experiment=state-test"]
    kfp_run_id = f"run-{state.lower()}"
    parent = runtime.open_lineage("", overrides, uri, kfp_run_id, "hsissl", {})
    assert runtime.close_lineage("", overrides, uri, kfp_run_id, state) == parent
    run = MlflowClient(tracking_uri=uri).get_run(parent)
    assert run.info.status == status
    assert run.data.tags["kfp_state"] == state
    assert run.data.tags["pipeline_outcome"] == outcome
