"""Run the pipeline on this machine under ``kfp.local`` (SubprocessRunner, this venv).

The same pipeline function that is compiled for the cluster runs here; Kubernetes settings
are ignored. Every local run gets an id (``local-…``, exported as $KFP_RUN_ID so lineage and
checkpoints work as in the cluster) and a record folder ``<run_dir>/pipeline-runs/<id>/``
with ``run.json``: arguments, status, and every task's outputs (artifact URIs and the
object-store URIs they point to). ``rerun`` reads that record instead of recomputing.
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

from hsissl.config import load_config
from pipelines.dag import STAGES, build_pipeline, build_stage_pipeline
from pipelines.options import PipelineOptions

RUNS_FOLDER = "pipeline-runs"
RECORD = "run.json"
CACHE_FOLDER = ".kfp-cache"  # kfp.local's task cache, beside the run records


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

    def output(self, task: str, name: str) -> dict[str, Any]:
        """``{"uri", "metadata"}`` of artifact ``name`` of the one task called ``task``."""
        found = [t for path, t in self.tasks.items() if path.rsplit("/", 1)[-1] == task]
        if len(found) != 1:
            raise KeyError(f"run {self.run_id}: expected one task {task!r}, found {len(found)} "
                           f"(tasks: {sorted(self.tasks)})")  # fmt: skip
        artifacts = found[0].get("artifacts", {})
        if name not in artifacts:
            raise KeyError(f"run {self.run_id}: task {task!r} has no output {name!r} "
                           f"(outputs: {sorted(artifacts)})")  # fmt: skip
        return artifacts[name]

    def store_uri(self, task: str, name: str) -> str:
        """The object-store URI that output ``name`` of ``task`` points to."""
        return self.output(task, name)["metadata"]["uri"]


def new_run_id() -> str:
    return f"local-{datetime.now(UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def local_arguments(config: str | Path | None, overrides: list[str]) -> dict[str, Any]:
    """Pipeline arguments for this machine: the preset as an absolute path, an absolute run
    folder, the store and MLflow the config names (default: inside the run folder)."""
    from hsissl import tracking

    cfg = load_config(config, overrides)
    run_dir = Path(cfg.run_dir).resolve()
    return {
        "preset": str(Path(config).resolve()) if config else "",
        "overrides": [*overrides, f"run_dir={json.dumps(str(run_dir))}"],
        "storage_uri": cfg.storage.uri or str(run_dir / "artifacts"),
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
    failed run raises (else its record says FAILED)."""
    from kfp import local

    run_id = run_id or new_run_id()
    record_dir = run_dir_of(arguments) / RUNS_FOLDER / run_id
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
    return run


def run_local(config: str | Path | None, overrides: list[str], stages: Iterable[str] = STAGES,
              parameters: dict[str, Any] | None = None, opts: PipelineOptions | None = None,
              run_id: str | None = None, cache: bool = False, check: bool = True) -> LocalRun:  # fmt: skip
    """The DAG (or the sub-DAG of ``stages``) on this machine, with the config's store/MLflow.

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

    ``encoder`` (finetune-heads): which pretraining's encoder (mae | dinov2 | ssvit), or
    ``random`` for the random-init control. ``run_id``: a new one by default; the id of an
    interrupted rerun resumes its checkpoints.
    """
    earlier = load_run(from_run)
    base = {k: earlier.arguments[k] for k in ("preset", "storage_uri", "tracking_uri")}
    arguments: dict[str, Any] = base | {
        "overrides": [*earlier.arguments["overrides"], *overrides],
        "source": earlier.arguments.get("source", ""),
    }
    if stage not in ("ingest", "report"):
        arguments["dataset_uri"] = earlier.store_uri("ingest", "dataset")
    if stage == "finetune-heads":
        task = "encoder-ref" if encoder == "random" else f"pretrain-{encoder}"
        arguments["encoder_uri"] = earlier.store_uri(task, "encoder")
        arguments["head"] = head
    return run_stage_local(stage, arguments, run_id=run_id, check=check)


def load_run(where: str | Path) -> LocalRun:
    """A run record: its folder, its run.json, or a run folder (its latest pipeline run)."""
    path = Path(where)
    candidates = [path / RECORD, path, path / RUNS_FOLDER / "latest"]
    if (path / RUNS_FOLDER / "latest").is_file():
        latest = (path / RUNS_FOLDER / "latest").read_text().strip()
        candidates.insert(0, path / RUNS_FOLDER / latest / RECORD)
    for candidate in candidates:
        if candidate.is_file() and candidate.name == RECORD:
            return LocalRun(**json.loads(candidate.read_text()))
    raise FileNotFoundError(
        f"no local pipeline run record at {path}: expected <record folder>/{RECORD}, the file "
        f"itself, or a run folder with {RUNS_FOLDER}/latest"
    )


def _save(run: LocalRun) -> None:
    record_dir = Path(run.record_dir)
    (record_dir / RECORD).write_text(json.dumps(asdict(run), indent=1, default=str))
    (record_dir.parent / "latest").write_text(run.run_id)


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
    from components import runtime

    try:
        cfg = runtime.stage_config(arguments["preset"], arguments["overrides"],
                                   {"tracking.uri": arguments["tracking_uri"]})  # fmt: skip
        return runtime.find_parent_run(cfg, run_id)
    except Exception:  # the record is still useful without it (e.g. MLflow went away)
        return None
