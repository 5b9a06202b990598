"""Thin MLflow helper every stage uses: one run per stage, config as params + artifact.

Uses ``MlflowClient`` only, so no global active run or global tracking URI is left
behind when the ``start_run`` block exits.

A run starts named after its stage; :meth:`Tracker.name_after` renames it ``<stage>-<name>``
after what it made (a result name or URI, or ``…/checkpoints/<name>/encoder.pt``).

Tracking must never cost training: MLflow's HTTP retries are bounded (``HTTP_LIMITS``), an
unreachable server fails a stage at its start (``TrackingError``, before any work), and once a
run has started every logging call is best-effort (see :class:`Tracker`); what an outage keeps
from MLflow waits on disk (``tracking_outbox``) and is sent by the next command that reaches it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from hsissl import tracking_outbox
from hsissl.config import flatten, save_resolved, to_yaml
from hsissl.layout import ENCODER, run_dir_of
from hsissl.mlflow_api import HTTP_LIMITS, apply_http_limits
from hsissl.mlflow_api import names as _mlflow

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # before mlflow is imported

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from hsissl.config import Config

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "HSISSL_PARENT_RUN_ID"
GIT_SHA_ENV = "HSISSL_GIT_SHA"
KFP_RUN_ENV = "KFP_RUN_ID"

RETRY_AFTER_S = 60.0  # pause after a failed call during a run; doubles while MLflow stays down
MAX_RETRY_AFTER_S = 900.0
MAX_PENDING_METRICS = 100_000  # metrics kept for MLflow during an outage; the oldest go first


class TrackingError(RuntimeError):
    """The MLflow tracking server could not be used when a run started."""


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


def _short(exc: BaseException, chars: int = 400) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= chars else text[:chars] + " …"


class Tracker:
    """Logging handle for one MLflow run (yielded by ``start_run``).

    Best-effort: no call raises into the caller. When MLflow fails, one warning names the
    URI and the step, metrics, params and tags wait in memory and the next try comes
    ``RETRY_AFTER_S`` later (doubling while it stays down); artifacts of an outage are
    skipped. A request MLflow answers with a client error (e.g. a changed param) is dropped
    with a warning.
    """

    def __init__(self, client: MlflowClient, run_id: str, stage: str = "", uri: str = "",
                 outbox: Path | None = None) -> None:  # fmt: skip
        self.client = client
        self.outbox = outbox  # where what waits is kept on disk during an outage (tracking_outbox)
        self.run_id = run_id
        self.stage = stage
        self.uri = uri
        self.step = 0  # last step logged: tells when an outage began
        self._metrics: list = []  # mlflow Metric objects not yet sent
        self._pending_params: dict[str, str] = {}
        self._tags: dict[str, str] = {}
        self._name: str | None = None  # run name not yet sent
        self._down_since: int | None = None  # step of the first failure of this outage
        self._retry_at = 0.0  # time.monotonic() of the next try during an outage
        self._pause = RETRY_AFTER_S

    @property
    def reachable(self) -> bool:
        """False from a failed call until a later one succeeds."""
        return self._down_since is None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if step is not None:
            self.step = step
        now_ms = int(time.time() * 1000)
        ml = _mlflow()
        self._metrics += [ml.Metric(k, float(v), now_ms, step or 0) for k, v in metrics.items()]
        del self._metrics[:-MAX_PENDING_METRICS]
        self._flush()

    def log_params(self, params: dict[str, object]) -> None:
        # MLflow rejects values over 6000 chars
        limit = _mlflow().MAX_PARAM_VAL_LENGTH
        self._pending_params |= {k: str(v)[:limit] for k, v in params.items()}
        self._flush()

    def set_tags(self, tags: dict[str, str]) -> None:
        self._tags |= {k: str(v) for k, v in tags.items()}
        self._flush()

    def name_after(self, output: str) -> None:
        """Rename the run ``<stage>-<name>`` after ``output`` (see :func:`run_name`)."""
        self._name = run_name(self.stage, output)
        self._flush()

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._attempt(f"artifact {path}", self.client.log_artifact, self.run_id, str(path),
                      artifact_path)  # fmt: skip

    def log_dict(self, data: dict, name: str) -> None:
        """Write ``data`` as the JSON artifact ``name`` (e.g. ``"metrics/final.json"``)."""
        self._attempt(f"artifact {name}", self.client.log_dict, self.run_id, data, name)

    def log_text(self, text: str, name: str) -> None:
        self._attempt(f"artifact {name}", self.client.log_text, self.run_id, text, name)

    def end(self, status: str) -> None:
        """Send what waits and mark the run ``status`` (FINISHED, FAILED or KILLED): one try
        even during an outage, bounded by ``HTTP_LIMITS``; never raises (it may run while
        another error propagates)."""
        self._retry_at = 0.0
        ended = self._flush() and self._attempt(
            f"status {status}", self.client.set_terminated, self.run_id, status
        )
        if ended:
            self._clear_outbox()
        elif self.outbox is not None:
            self._save_outbox(status)
            log.warning("MLflow run %s at %s could not be marked %s yet; what it misses is kept "
                        "in %s and sent by the next command of this run folder that reaches "
                        "MLflow, or by `hsissl tracking sync %s`", self.run_id, self.uri, status,
                        self.outbox, self.outbox.parent.parent)  # fmt: skip
        else:
            log.warning("MLflow run %s at %s stays RUNNING there: it could not be marked %s",
                        self.run_id, self.uri, status)  # fmt: skip

    def _save_outbox(self, status: str | None = None) -> None:
        if self.outbox is None:
            return
        state = {
            "uri": self.uri, "run_id": self.run_id, "params": self._pending_params,
            "metrics": [[m.key, m.value, m.timestamp, m.step] for m in self._metrics],
            "tags": self._tags, "name": self._name, "status": status,
            "end_time": int(time.time() * 1000) if status else None,
        }  # fmt: skip
        try:
            tracking_outbox.save(self.outbox, state)
        except OSError as exc:
            log.warning("could not keep the unsent MLflow data in %s: %s", self.outbox, exc)

    def _clear_outbox(self) -> None:
        if self.outbox is not None:
            self.outbox.unlink(missing_ok=True)

    # -- best-effort machinery --------------------------------------------------------
    def _flush(self) -> bool:
        """Send the waiting metrics, params, tags and name; True once nothing waits."""
        was_down = not self.reachable
        sent = self._attempt("metrics, params and tags", self._send_pending)
        if sent and was_down:
            self._clear_outbox()  # all of it arrived: a replay would send it twice
        return sent

    def _send_pending(self) -> None:
        ml = _mlflow()
        while self._metrics:  # sent chunks leave the queue at once: a retry never repeats them
            chunk = self._metrics[: ml.MAX_METRICS_PER_BATCH]
            self._send(f"{len(chunk)} metrics", self.client.log_batch, self.run_id, metrics=chunk)
            del self._metrics[: len(chunk)]
        for field, pending, entity in (("params", self._pending_params, ml.Param),
                                       ("tags", self._tags, ml.RunTag)):  # fmt: skip
            while pending:
                keys = list(pending)[: ml.MAX_PARAMS_TAGS_PER_BATCH]
                items = [entity(k, pending[k]) for k in keys]
                self._send(f"{field} {', '.join(keys)}", self.client.log_batch, self.run_id,
                           **{field: items})  # fmt: skip
                for k in keys:
                    del pending[k]
        if self._name is not None:
            self._send(f"run name {self._name}", self.client.update_run, self.run_id,
                       name=self._name)  # fmt: skip
            self._name = None

    def _send(
        self, what: str, call: Callable[..., object], *args: object, **kwargs: object
    ) -> None:
        """``call``; a request MLflow rejects (4xx: the server works) is dropped with a
        warning, any other failure (unreachable, 5xx, timeout) propagates."""
        try:
            call(*args, **kwargs)
        except _mlflow().MlflowException as exc:
            if exc.get_http_status_code() >= 500:
                raise
            log.warning("MLflow at %s rejected %s of run %s; dropped: %s", self.uri, what,
                        self.run_id, _short(exc))  # fmt: skip

    def _attempt(
        self, what: str, call: Callable[..., object], *args: object, **kwargs: object
    ) -> bool:
        """``_send`` unless MLflow is down and the next try is not due; False if it failed."""
        if not self.reachable and time.monotonic() < self._retry_at:
            return False
        try:
            self._send(what, call, *args, **kwargs)
        except Exception as exc:  # whatever the transport raises: logging must not stop work
            if self.reachable:
                self._down_since = self.step
                log.warning(
                    "MLflow at %s unreachable since step %d (%s); training continues, metrics "
                    "are kept in history.json (and sent to MLflow if it comes back; next try in "
                    "%.0f s)", self.uri, self.step, _short(exc), self._pause,
                )  # fmt: skip
            else:
                log.debug("MLflow at %s still unreachable at step %d: %s", self.uri, self.step,
                          _short(exc))  # fmt: skip
                self._pause = min(2 * self._pause, MAX_RETRY_AFTER_S)
            self._retry_at = time.monotonic() + self._pause
            self._save_outbox()
            return False
        if not self.reachable:
            log.warning("MLflow at %s reachable again at step %d (down since step %d)",
                        self.uri, self.step, self._down_since)  # fmt: skip
            self._down_since, self._pause = None, RETRY_AFTER_S
        return True


@contextmanager
def start_run(
    cfg: Config,
    stage: str,
    run_dir: Path,
    tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
) -> Iterator[Tracker]:
    """One MLflow run named ``stage`` (until :meth:`Tracker.name_after`) with the config logged;
    FAILED if the block raises, KILLED if it is interrupted (KeyboardInterrupt).

    Nested under ``parent_run_id`` (or $HSISSL_PARENT_RUN_ID) when given. Raises
    ``TrackingError`` before the block runs if the tracking store cannot be used.
    """
    ml = _mlflow()
    apply_http_limits()  # before the first request
    uri = resolve_uri(cfg.tracking.uri, run_dir)

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

    try:  # the first requests double as the up-front check: fail now, not hours into training
        with _schema_lock(uri):
            client = ml.MlflowClient(tracking_uri=uri)
            exp_id = experiment_id(client, cfg.tracking.experiment, uri)
        run_id = client.create_run(exp_id, run_name=stage, tags=run_tags).info.run_id
    except Exception as exc:
        raise TrackingError(_unusable_message(cfg, uri, exc)) from exc
    _replay_outbox(run_dir, uri)
    tracker = Tracker(client, run_id, stage, uri, tracking_outbox.path_for(run_dir, run_id))
    tracker.log_params(flatten(cfg))
    tracker.log_text(to_yaml(cfg), "config.yaml")
    status = "FINISHED"
    try:
        yield tracker
    except KeyboardInterrupt:  # Ctrl-C, or a stop signal the stage turned into one
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        tracker.end(status)


@contextmanager
def stage_run(cfg: Config, stage: str) -> Iterator[Tracker]:
    """A tracked run of one stage; the resolved config is saved in the run folder and MLflow."""
    save_resolved(cfg, run_dir_of(cfg) / stage / "config.yaml")
    with start_run(cfg, stage=stage, run_dir=run_dir_of(cfg)) as tracker:
        yield tracker


@contextmanager
def _schema_lock(uri: str) -> Iterator[None]:
    """Serialise the first use of a sqlite store across processes: MLflow creates its tables
    then, and two stages started together in a fresh run folder would both try (MLflow 3.17:
    ``OperationalError: table experiments already exists``)."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    lock = Path(uri.removeprefix("sqlite:///") + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
        yield


def _replay_outbox(run_dir: Path, uri: str) -> None:
    """Send what earlier runs of this folder kept during an MLflow outage (tracking_outbox)."""
    sent, failed = tracking_outbox.sync(run_dir, only_uri=uri)
    for line in sent:
        log.info("sent to MLflow what it missed during an outage: %s", line)
    for line in failed:
        log.warning("could not yet send to MLflow what it missed: %s", line)


def _unusable_message(cfg: Config, uri: str, exc: Exception) -> str:
    if cfg.tracking.uri:
        source = "tracking.uri"
    elif os.environ.get("MLFLOW_TRACKING_URI"):
        source = "$MLFLOW_TRACKING_URI (tracking.uri is empty)"
    else:
        source = "the default local store (tracking.uri and $MLFLOW_TRACKING_URI are empty)"
    message = f"MLflow tracking at {uri} (from {source}) cannot be used: {_short(exc)}. "
    if uri.startswith(("http://", "https://")):
        limits = ", ".join(f"{k}={os.environ.get(k)}" for k in HTTP_LIMITS)
        return message + (
            f"Check that tracking.uri names the MLflow server, that it runs and is reachable "
            f"from here (curl {uri.rstrip('/')}/health), or set tracking.uri to a "
            f"sqlite:///<file> to track locally (HTTP limits: {limits})"
        )
    return message + "Check that tracking.uri names a usable MLflow store"


def run_name(stage: str, output: str) -> str:
    """``<stage>-<name>`` for the result/checkpoint ``output`` (a name or a URI), without
    repeating the words they share: ``finetune`` + ``finetune-mae-linear`` ->
    ``finetune-mae-linear``; ``pretrain-mae`` + ``…/checkpoints/mae-local-1/encoder.pt`` ->
    ``pretrain-mae-local-1``."""
    parts = [p for p in output.rstrip("/").split("/") if p]
    name = parts[-2] if len(parts) > 1 and parts[-1] == ENCODER else (parts or [""])[-1]
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
