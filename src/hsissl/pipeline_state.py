"""What a pipeline's final state string means for its MLflow parent run.

The exit task receives ``PipelineTaskFinalStatus.state``, and the strings differ by runner:

- KFP backend 2.14-2.17: the MLMD execution state of the exit handler's DAG
  (``backend/src/v2/driver/resolve.go``: ``producer.GetExecution().GetLastKnownState().String()``),
  i.e. ``COMPLETE`` on success, ``FAILED``, ``CANCELED``; and on 2.14-2.16 ``RUNNING`` when the
  exit handler holds nested If/ParallelFor DAGs (the driver only updated a task's direct parent
  DAG; ``metadata/client.go`` propagates upward from 2.17).
- ``kfp.local`` (kfp 2.17): the task status, ``SUCCEEDED`` or ``FAILED``.
- task-state APIs: ``SYSTEM_ERROR`` for a platform failure.

Anything else (``RUNNING``, ``UNKNOWN``, ``""`` …) is not evidence of failure: it is recorded as
``unknown`` rather than turned into a failed run.
"""

from __future__ import annotations

from dataclasses import dataclass

SUCCEEDED_STATES = frozenset({"COMPLETE", "SUCCEEDED"})
FAILED_STATES = frozenset({"FAILED", "CANCELED", "SYSTEM_ERROR"})
OUTCOME_TAG = "pipeline_outcome"  # succeeded | failed | unknown
STATE_TAG = "kfp_state"  # the raw string, as the runner passed it


@dataclass(frozen=True)
class Outcome:
    name: str  # succeeded | failed | unknown
    mlflow_status: str  # how the parent run ends: FINISHED or FAILED

    def tags(self, state: str) -> dict[str, str]:
        return {STATE_TAG: state, OUTCOME_TAG: self.name}


def pipeline_outcome(state: str) -> Outcome:
    """The outcome of a pipeline whose exit task saw ``state`` (case and blanks ignored).

    An unknown state ends the parent run FINISHED (MLflow has no "unknown" status; FINISHED
    only says the run ended) and is told apart by the ``pipeline_outcome=unknown`` tag.
    """
    key = (state or "").strip().upper()
    if key in SUCCEEDED_STATES:
        return Outcome("succeeded", "FINISHED")
    if key in FAILED_STATES:
        return Outcome("failed", "FAILED")
    return Outcome("unknown", "FINISHED")
