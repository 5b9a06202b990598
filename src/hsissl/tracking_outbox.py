"""What MLflow has not received yet, kept on disk with the run until a command can send it.

A tracked run that loses its MLflow server (:class:`hsissl.tracking.Tracker`) writes what
waits (metrics, params, tags, run name and, at its end, the final status) to
``<run_dir>/mlflow-outbox/<run_id>.json``. The next command of that run folder that reaches the
server (any stage's ``start_run``), or ``hsissl tracking sync <run_dir>``, sends it and marks the
run FINISHED/FAILED/KILLED as its process ended it; the file goes once everything arrived.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

from hsissl import mlflow_api

log = logging.getLogger(__name__)

OUTBOX = "mlflow-outbox"  # folder in the run folder


def path_for(run_dir: Path, run_id: str) -> Path:
    return Path(run_dir) / OUTBOX / f"{run_id}.json"


def save(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` (see :meth:`Tracker._outbox_state`) atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(json.dumps(state))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def replay(path: Path, uri: str | None = None) -> str:
    """Send one outbox file to its server (or ``uri``) and delete it; returns what was sent.
    Raises whatever MLflow raises when the server is still unreachable (the file stays)."""
    ml = mlflow_api.names()
    mlflow_api.apply_http_limits()
    state = json.loads(path.read_text())
    client = ml.MlflowClient(tracking_uri=uri or state["uri"])
    run_id = state["run_id"]
    metrics = [ml.Metric(k, v, ts, step) for k, v, ts, step in state.get("metrics", [])]
    for start in range(0, len(metrics), ml.MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[start : start + ml.MAX_METRICS_PER_BATCH])
        state["metrics"] = state["metrics"][ml.MAX_METRICS_PER_BATCH :]  # sent: never twice
        save(path, state)
    for field, entity in (("params", ml.Param), ("tags", ml.RunTag)):
        items = [entity(k, v) for k, v in state.get(field, {}).items()]
        for start in range(0, len(items), ml.MAX_PARAMS_TAGS_PER_BATCH):
            try:
                client.log_batch(
                    run_id, **{field: items[start : start + ml.MAX_PARAMS_TAGS_PER_BATCH]}
                )
            except ml.MlflowException as exc:
                if exc.get_http_status_code() >= 500:
                    raise
                log.warning("MLflow rejected %s of run %s; dropped: %s", field, run_id, exc)
    if state.get("name"):
        client.update_run(run_id, name=state["name"])
    if state.get("status"):
        client.set_terminated(run_id, state["status"], end_time=state.get("end_time"))
    path.unlink()
    return (f"run {run_id}: {len(metrics)} metrics"
            + (f", status {state['status']}" if state.get("status") else ""))  # fmt: skip


def sync(run_dir: Path, only_uri: str | None = None,
         send_to: str | None = None) -> tuple[list[str], list[str]]:  # fmt: skip
    """Replay every outbox file of ``run_dir`` (those recorded for ``only_uri`` when given) to
    its recorded server or ``send_to``: (what was sent, what could not be and why)."""
    sent, failed = [], []
    for path in sorted((Path(run_dir) / OUTBOX).glob("*.json")):
        try:
            if only_uri is not None and json.loads(path.read_text()).get("uri") != only_uri:
                continue
            sent.append(replay(path, send_to))
        except Exception as exc:  # the server is still down, or a broken file: keep it
            failed.append(
                f"{path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            )
    return sent, failed
