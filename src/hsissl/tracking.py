"""Thin MLflow helper every stage uses: one run per stage, config as params + artifact.

Uses ``MlflowClient`` only, so no global active run or global tracking URI is left
behind when the ``start_run`` block exits.

A run starts named after its stage; the tags a stage sets name what it made, so
:meth:`Tracker.set_tags` renames the run ``<stage>-<name>`` from the ``results`` tag (a result
name or URI) or, failing that, the ``encoder_uri`` tag (``…/checkpoints/<name>/encoder.pt``),
and logs ``encoder_uri`` (the encoder a run trained or used, resolved) as a param as well.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

from hsissl.config import flatten, to_yaml

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # before mlflow is imported

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from hsissl.config import Config

NAME_TAGS = ("results", "encoder_uri")  # tags naming a run's output, first present wins
PARAM_TAGS = ("encoder_uri",)  # tags also logged as params (searchable, shown with the config)
PARENT_RUN_ENV = "HSISSL_PARENT_RUN_ID"
GIT_SHA_ENV = "HSISSL_GIT_SHA"
KFP_RUN_ENV = "KFP_RUN_ID"


@cache
def _mlflow() -> SimpleNamespace:
    """The MLflow names this module uses, imported on first use: only tracked runs need mlflow,
    so the library (training, benchmarks) imports and runs on machines without it."""
    try:
        from mlflow import entities, exceptions, tracking
        from mlflow.utils import mlflow_tags, validation
    except ImportError as exc:
        raise ImportError(
            f"experiment tracking (hsissl.tracking) needs the 'mlflow' package, which failed to "
            f"import ({exc}); install it with `pip install mlflow`"
        ) from exc
    return SimpleNamespace(
        Metric=entities.Metric, Param=entities.Param, RunTag=entities.RunTag,
        MlflowException=exceptions.MlflowException, MlflowClient=tracking.MlflowClient,
        MLFLOW_PARENT_RUN_ID=mlflow_tags.MLFLOW_PARENT_RUN_ID,
        MAX_METRICS_PER_BATCH=validation.MAX_METRICS_PER_BATCH,
        MAX_PARAM_VAL_LENGTH=validation.MAX_PARAM_VAL_LENGTH,
        MAX_PARAMS_TAGS_PER_BATCH=validation.MAX_PARAMS_TAGS_PER_BATCH,
    )  # fmt: skip


def resolve_uri(configured: str, run_dir: str | Path) -> str:
    """The tracking URI: ``configured`` if set, else $MLFLOW_TRACKING_URI, else a sqlite
    file ``<run_dir>/mlflow.db`` (``run_dir`` is created)."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{run_dir}/mlflow.db"


class Tracker:
    """Logging handle for one MLflow run (yielded by ``start_run``)."""

    def __init__(self, client: MlflowClient, run_id: str, stage: str = "") -> None:
        self.client = client
        self.run_id = run_id
        self.stage = stage
        self._named_by: int | None = None  # index in NAME_TAGS of the tag that named the run
        self._params: set[str] = set()  # PARAM_TAGS already logged (MLflow params are final)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        now_ms = int(time.time() * 1000)
        ml = _mlflow()
        items = [ml.Metric(k, float(v), now_ms, step or 0) for k, v in metrics.items()]
        for i in range(0, len(items), ml.MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=items[i : i + ml.MAX_METRICS_PER_BATCH])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, data: dict, name: str) -> None:
        """Write ``data`` as the JSON artifact ``name`` (e.g. ``"metrics/final.json"``)."""
        self.client.log_dict(self.run_id, data, name)

    def set_tags(self, tags: dict[str, str]) -> None:
        """Set ``tags``; a ``results``/``encoder_uri`` tag also names the run (module doc)."""
        ml = _mlflow()
        items = [ml.RunTag(k, str(v)) for k, v in tags.items()]
        for i in range(0, len(items), ml.MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=items[i : i + ml.MAX_PARAMS_TAGS_PER_BATCH])
        params = [
            ml.Param(k, str(tags[k])[: ml.MAX_PARAM_VAL_LENGTH])
            for k in PARAM_TAGS
            if tags.get(k) and k not in self._params
        ]
        if params:
            self.client.log_batch(self.run_id, params=params)
            self._params |= {p.key for p in params}
        for rank, key in enumerate(NAME_TAGS):
            if tags.get(key) and (self._named_by is None or rank <= self._named_by):
                self.client.update_run(self.run_id, name=run_name(self.stage, str(tags[key])))
                self._named_by = rank
                break


@contextmanager
def start_run(
    cfg: Config,
    stage: str,
    run_dir: Path,
    tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
) -> Iterator[Tracker]:
    """One MLflow run named ``stage`` (until a naming tag is set) with the config logged;
    FAILED if the block raises.

    Nested under ``parent_run_id`` (or $HSISSL_PARENT_RUN_ID) when given.
    """
    ml = _mlflow()
    uri = resolve_uri(cfg.tracking.uri, run_dir)
    client = ml.MlflowClient(tracking_uri=uri)
    exp_id = experiment_id(client, cfg.tracking.experiment, uri)

    run_tags = {"stage": stage}
    sha = git_sha()
    if sha:
        run_tags["git_sha"] = sha
    if os.environ.get(KFP_RUN_ENV):
        run_tags["kfp_run_id"] = os.environ[KFP_RUN_ENV]
    parent = parent_run_id or os.environ.get(PARENT_RUN_ENV)
    if parent:
        run_tags[ml.MLFLOW_PARENT_RUN_ID] = parent
    run_tags.update(tags or {})

    run = client.create_run(exp_id, run_name=stage, tags=run_tags)
    tracker = Tracker(client, run.info.run_id, stage)
    try:
        # MLflow rejects values over 6000 chars and more than 100 params per call
        params = [ml.Param(k, str(v)[: ml.MAX_PARAM_VAL_LENGTH]) for k, v in flatten(cfg).items()]
        for i in range(0, len(params), ml.MAX_PARAMS_TAGS_PER_BATCH):
            client.log_batch(tracker.run_id, params=params[i : i + ml.MAX_PARAMS_TAGS_PER_BATCH])
        client.log_text(tracker.run_id, to_yaml(cfg), "config.yaml")
        yield tracker
    except BaseException:
        client.set_terminated(tracker.run_id, "FAILED")
        raise
    client.set_terminated(tracker.run_id, "FINISHED")


def run_name(stage: str, output: str) -> str:
    """``<stage>-<name>`` for the result/checkpoint ``output`` (a name or a URI), without
    repeating the words they share: ``finetune`` + ``finetune-mae-linear`` ->
    ``finetune-mae-linear``; ``pretrain-mae`` + ``…/checkpoints/mae-local-1/encoder.pt`` ->
    ``pretrain-mae-local-1``."""
    parts = [p for p in output.rstrip("/").split("/") if p]
    name = parts[-2] if len(parts) > 1 and parts[-1] == "encoder.pt" else (parts or [""])[-1]
    if not name:
        return stage
    words, out = stage.split("-"), name.split("-")
    overlap = max(k for k in range(len(words) + 1) if words[len(words) - k :] == out[:k])
    return "-".join(words + out[overlap:])


def experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        # without this MLflow would put artifacts in ./mlruns of whatever the cwd is
        location = (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except _mlflow().MlflowException:
        # parallel stages may race to create it; the loser reuses the winner's
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def git_sha() -> str | None:
    """$HSISSL_GIT_SHA, else ``git rev-parse HEAD`` in the cwd, else None."""
    if os.environ.get(GIT_SHA_ENV):
        return os.environ[GIT_SHA_ENV]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None
