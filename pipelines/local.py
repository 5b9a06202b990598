"""Run the pipeline on this machine under ``kfp.local`` (SubprocessRunner, this venv).

The same pipeline function that is compiled for the cluster runs here; Kubernetes settings
are ignored. Every local run gets an id (``local-…``, exported as $KFP_RUN_ID so lineage and
checkpoints work as in the cluster) and a record folder ``<run_dir>/pipeline-runs/<id>/``
with ``run.json``: arguments, status, and every task's outputs (artifact URIs and the
object-store URIs they point to). ``rerun`` reads that record instead of recomputing.

``<run_dir>/pipeline-runs/latest`` names the newest full-DAG run (pipeline ``hsissl``) that got
as far as its dataset: what ``rerun --from-run <run_dir>`` starts from. Reruns, one-stage runs
and runs that failed before ingest finished leave it alone.
"""

from __future__ import annotations

import json
import os
import uuid
import warnings
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from components.options import PipelineOptions
from hsissl.config import load_config
from hsissl.layout import PIPELINE_RUNS, default_store, pipeline_runs
from pipelines.dag import (
    CONTROL_ENCODER,
    PIPELINE_NAME,
    build_pipeline,
    build_stage_pipeline,
)

RECORD = "run.json"
LATEST = "latest"  # in PIPELINE_RUNS: the id of the newest full-DAG run with a dataset
CACHE_FOLDER = ".kfp-cache"  # kfp.local's task cache, beside the run records
DATASET_TASKS = ("ingest", "dataset-ref")  # a full run's dataset, a rerun's reference to it
# Python types of KFP parameter types (component_spec.inputs[...].type)
PARAMETER_TYPES: dict[str, tuple[type, ...]] = {
    "String": (str,), "Boolean": (bool,), "Integer": (int,), "Float": (int, float),
    "List": (list,), "Dict": (dict,), "Struct": (dict,),
}  # fmt: skip


class RunRecordError(ValueError):
    """A run record lacks what was asked of it (a task, an output)."""


class ParameterError(ValueError):
    """An argument the pipeline has no parameter for, or of the wrong type."""


@dataclass
class LocalRun:
    """What a local run did; saved as ``<record_dir>/run.json``."""

    run_id: str
    pipeline: str
    record_dir: str
    arguments: dict[str, Any]
    status: str = "RUNNING"  # SUCCEEDED | FAILED
    error: str = ""
    parent_run_id: str | None = None
    started: str = ""
    finished: str = ""
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)  # task path -> outputs

    def describe(self) -> str:
        """Which record this is, for error messages."""
        return (
            f"run record {Path(self.record_dir) / RECORD} (pipeline {self.pipeline}, {self.status})"
        )

    def _named(self, task: str) -> list[dict[str, Any]]:
        return [t for path, t in self.tasks.items() if path.rsplit("/", 1)[-1] == task]

    def has_output(self, task: str, name: str) -> bool:
        """Whether exactly one task called ``task`` has an output ``name``."""
        found = self._named(task)
        return len(found) == 1 and name in found[0].get("artifacts", {})

    def output(self, task: str, name: str) -> dict[str, Any]:
        """``{"uri", "metadata"}`` of artifact ``name`` of the one task called ``task``."""
        found = self._named(task)
        if len(found) != 1:
            raise RunRecordError(f"{self.describe()}: expected one task {task!r}, found "
                                 f"{len(found)} (tasks: {sorted(self.tasks)})")  # fmt: skip
        artifacts = found[0].get("artifacts", {})
        if name not in artifacts:
            raise RunRecordError(f"{self.describe()}: task {task!r} has no output {name!r} "
                                 f"(outputs: {sorted(artifacts)})")  # fmt: skip
        return artifacts[name]

    def store_uri(self, task: str, name: str) -> str:
        """The object-store URI that output ``name`` of ``task`` points to."""
        return self.output(task, name)["metadata"]["uri"]

    def dataset_uri(self) -> str:
        """The dataset this run made (``ingest``) or, for a rerun, started from
        (``dataset-ref``)."""
        for task in DATASET_TASKS:
            if self.has_output(task, "dataset"):
                return self.store_uri(task, "dataset")
        raise RunRecordError(f"{self.describe()}: no dataset: no task {' or '.join(DATASET_TASKS)} "
                             f"with output 'dataset' (tasks: {sorted(self.tasks)}); pass the record folder "
                             f"of a run that has one, <run_dir>/{PIPELINE_RUNS}/<id>")  # fmt: skip

    def encoder_uri(self, method: str) -> str:
        """The encoder that ``pretrain-<method>`` of this run wrote."""
        task = f"pretrain-{method}"
        if not self.has_output(task, "encoder"):
            raise RunRecordError(
                f"{self.describe()}: no {method} encoder: no task {task!r} with output 'encoder' "
                f"(tasks: {sorted(self.tasks)}); pass the record of a run that pretrained {method}"
            )
        return self.store_uri(task, "encoder")

    def is_full_run_with_dataset(self) -> bool:
        """A run of the DAG (not a rerun) that got as far as its dataset: what ``latest`` names."""
        return self.pipeline == PIPELINE_NAME and self.has_output("ingest", "dataset")


def new_run_id() -> str:
    return f"local-{datetime.now(UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def check_arguments(pipeline: Any, arguments: dict[str, Any]) -> None:
    """Raise :class:`ParameterError` unless every argument is a parameter of ``pipeline`` (a
    pipeline function or a loaded component) with a value of its type."""
    inputs = pipeline.component_spec.inputs or {}
    valid = ", ".join(f"{name} ({spec.type})" for name, spec in inputs.items())
    unknown = sorted(set(arguments) - set(inputs))
    if unknown:
        raise ParameterError(f"pipeline {pipeline.name}: unknown parameter(s) {unknown}; "
                             f"valid: {valid}")  # fmt: skip
    for name, value in arguments.items():
        kind = inputs[name].type
        expected = PARAMETER_TYPES.get(kind)
        is_bool = isinstance(value, bool)  # bool is an int in Python, not in KFP
        if expected and (not isinstance(value, expected) or is_bool != (kind == "Boolean")):
            raise ParameterError(f"pipeline {pipeline.name}: parameter {name!r} is of type {kind}, "
                                 f"got {value!r} ({type(value).__name__})")  # fmt: skip


def local_arguments(config: str | Path | None, overrides: list[str]) -> dict[str, Any]:
    """Pipeline arguments for this machine: the preset as an absolute path, an absolute run
    folder, the store and MLflow the config names (default: inside the run folder)."""
    from hsissl import tracking

    cfg = load_config(config, overrides)
    run_dir = Path(cfg.run_dir).resolve()
    return {
        "preset": str(Path(config).resolve()) if config else "",
        "overrides": [*overrides, f"run_dir={json.dumps(str(run_dir))}"],
        "storage_uri": cfg.storage.uri or str(default_store(run_dir)),
        "tracking_uri": tracking.resolve_uri(cfg.tracking.uri, run_dir),
    }


def run_dir_of(arguments: dict[str, Any]) -> Path:
    cfg = load_config(arguments["preset"] or None, arguments["overrides"])
    return Path(cfg.run_dir).resolve()


@contextmanager
def _run_env(run_id: str):
    """$KFP_RUN_ID for the components (they inherit this process's environment)."""
    saved = {k: os.environ.get(k) for k in ("KFP_RUN_ID", "HSISSL_PARENT_RUN_ID")}
    os.environ["KFP_RUN_ID"] = run_id
    os.environ.pop("HSISSL_PARENT_RUN_ID", None)  # each run opens its own parent run
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def execute(pipeline_func: Callable, arguments: dict[str, Any], run_id: str | None = None,
            cache: bool = False, check: bool = True) -> LocalRun:  # fmt: skip
    """Run ``pipeline_func(**arguments)`` under kfp.local and record it; with ``check``, a
    failed run raises (else its record says FAILED). Arguments the pipeline has no parameter
    for raise :class:`ParameterError` before anything runs or is recorded."""
    from kfp import local

    check_arguments(pipeline_func, arguments)
    run_id = run_id or new_run_id()
    record_dir = pipeline_runs(run_dir_of(arguments)) / run_id
    record_dir.mkdir(parents=True, exist_ok=True)
    earlier_jobs = set((record_dir / "kfp").glob("*"))  # a resumed run id reuses its folder
    run = LocalRun(run_id, pipeline_func.name, str(record_dir), arguments,
                   started=datetime.now(UTC).isoformat(timespec="seconds"))  # fmt: skip
    _save(run)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(record_dir / "kfp"),
               raise_on_error=True, enable_caching=cache,
               cache_root=str(record_dir.parent / CACHE_FOLDER))  # shared by the run folder's runs  # fmt: skip
    try:
        with _run_env(run_id), warnings.catch_warnings():
            # the images are ours, not python:*; this venv has everything they have
            warnings.filterwarnings("ignore", message=".*non-Python base image.*")
            warnings.filterwarnings("ignore", message=".*no effect in the current local runner.*")
            pipeline_func(**arguments)
        run.status = "SUCCEEDED"
    except Exception as exc:
        run.status, run.error = "FAILED", f"{type(exc).__name__}: {exc}"
        if check:
            raise
    finally:
        run.finished = datetime.now(UTC).isoformat(timespec="seconds")
        run.tasks = _collect_outputs(record_dir / "kfp", earlier_jobs)
        run.parent_run_id = _parent_run(arguments, run_id)
        _save(run)
        if run.is_full_run_with_dataset():
            (record_dir.parent / LATEST).write_text(run.run_id)
    return run


def run_local(config: str | Path | None, overrides: list[str], stages: Iterable[str] | None = None,
              parameters: dict[str, Any] | None = None, opts: PipelineOptions | None = None,
              run_id: str | None = None, cache: bool = False, check: bool = True) -> LocalRun:  # fmt: skip
    """The DAG (or the sub-DAG of ``stages``; None: all) on this machine, with the config's store/MLflow.

    ``parameters``: other pipeline parameters (``run_dinov2=False``, ``heads=["linear"]``, …).
    """
    arguments = local_arguments(config, overrides) | (parameters or {})
    return execute(build_pipeline(opts, stages), arguments, run_id, cache, check)


def run_stage_local(stage: str, arguments: dict[str, Any], opts: PipelineOptions | None = None,
                    run_id: str | None = None, check: bool = True) -> LocalRun:  # fmt: skip
    """One stage on existing artifacts (``dataset_uri``, ``encoder_uri`` … in ``arguments``)."""
    return execute(build_stage_pipeline(stage, opts), arguments, run_id, check=check)


def rerun_local(stage: str, from_run: str | Path, overrides: list[str], encoder: str = "mae",
                head: str = "", run_id: str | None = None, check: bool = True) -> LocalRun:  # fmt: skip
    """Rerun ``stage`` of an earlier local run with extra ``overrides``, on that run's artifacts.

    ``from_run``: see :func:`load_run`; a rerun's record works too (its ``dataset-ref``
    dataset, the encoder of its ``pretrain-<method>``). ``encoder`` (finetune-heads): which
    pretraining's encoder (mae | dinov2 | ssvit), or ``random`` for the random-init control
    (the run's ``control_encoder``, default the config's MAE architecture). ``run_id``: a new
    one by default; the id of an interrupted rerun resumes its checkpoints.
    """
    earlier = load_run(from_run)
    base = {k: earlier.arguments[k] for k in ("preset", "storage_uri", "tracking_uri")}
    arguments: dict[str, Any] = base | {
        "overrides": [*earlier.arguments["overrides"], *overrides],
        "source": earlier.arguments.get("source", ""),
    }
    if stage not in ("ingest", "report"):
        arguments["dataset_uri"] = earlier.dataset_uri()
    if stage == "finetune-heads":
        if encoder == "random":
            arguments["encoder_uri"] = earlier.arguments.get("control_encoder") or CONTROL_ENCODER
        else:
            arguments["encoder_uri"] = earlier.encoder_uri(encoder)
        arguments["head"] = head
    return run_stage_local(stage, arguments, run_id=run_id, check=check)


def load_run(where: str | Path) -> LocalRun:
    """A run record: its folder, its ``run.json``, or a run folder (``run_dir``, or its
    ``pipeline-runs``): the run ``pipeline-runs/latest`` names."""
    path = Path(where)
    if path.is_file():
        record = path
    elif (path / RECORD).is_file():
        record = path / RECORD
    else:
        runs = path if (path / LATEST).is_file() else pipeline_runs(path)
        if not (runs / LATEST).is_file():
            raise FileNotFoundError(
                f"no local pipeline run record at {path}: expected a record folder with {RECORD}, "
                f"the file itself, or a run folder with {PIPELINE_RUNS}/{LATEST} (written when a full "
                "run, hsissl-pipeline run-local, has produced its dataset)"
            )
        record = runs / (runs / LATEST).read_text().strip() / RECORD
        if not record.is_file():
            raise FileNotFoundError(f"{runs / LATEST} names a run whose record {record} is missing")
    try:
        return LocalRun(**json.loads(record.read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise RunRecordError(f"{record}: not a local pipeline run record ({exc})") from exc


def _save(run: LocalRun) -> None:
    (Path(run.record_dir) / RECORD).write_text(json.dumps(asdict(run), indent=1, default=str))


def _collect_outputs(pipeline_root: Path, earlier_jobs: set[Path]) -> dict[str, dict[str, Any]]:
    """Every task's outputs from kfp.local's executor_output.json files of this execution."""
    tasks: dict[str, dict[str, Any]] = {}
    jobs = sorted(
        p
        for p in set(pipeline_root.glob("*")) - earlier_jobs
        if p.is_dir() and not p.name.startswith(".")
    )  # not kfp.local's .kfp_cache
    if not jobs:
        return tasks
    for path in sorted(jobs[-1].glob("**/executor_output.json")):
        out = json.loads(path.read_text())
        name = "/".join(path.relative_to(pipeline_root).parts[1:-1])  # <job>/<task path>/…
        artifacts = {
            key: {
                "uri": value["artifacts"][0]["uri"],
                "metadata": value["artifacts"][0].get("metadata", {}),
            }
            for key, value in out.get("artifacts", {}).items()
            if value.get("artifacts")
        }
        tasks[name] = {"parameters": out.get("parameterValues", {}), "artifacts": artifacts}
    return tasks


def _parent_run(arguments: dict[str, Any], run_id: str) -> str | None:
    from hsissl.presets import stage_config
    from hsissl.tracking_lineage import find_parent_run

    try:
        cfg = stage_config(arguments["preset"], arguments["overrides"],
                           {"tracking.uri": arguments["tracking_uri"]})  # fmt: skip
        return find_parent_run(cfg, run_id)
    except Exception:  # the record is still useful without it (e.g. MLflow went away)
        return None
