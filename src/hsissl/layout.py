"""Where everything lives: the one owner of every path in the artifact store and the run folder.

The artifact store (``storage.uri``, default ``<run_dir>/artifacts``)::

    datasets/<data.name>/         manifest.json + shards                  (ingest)
    checkpoints/<pretrain.name>/  train.pt, encoder.pt, history.json      (pretraining)
    results/<name>/               metrics.json, predictions.npz, ...      (finetune, baseline,
                                                                           pca-poc, evaluate-real)
    reports/<report.name>/        report.html, summary.md                 (report)

The run folder (``run_dir``): ``artifacts/`` (the default store) and ``pipeline-runs/<id>/``
(the records of local pipeline runs). Keys here are relative to the store root; a URI is
``storage.join(key)``. Nothing else builds these strings.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from hsissl.storage import Storage, open_storage

if TYPE_CHECKING:
    from hsissl.config import Config

# Top-level folders of the store.
DATASETS = "datasets"
CHECKPOINTS = "checkpoints"
RESULTS = "results"
REPORTS = "reports"

# In the run folder.
ARTIFACTS = "artifacts"  # the default artifact store
PIPELINE_RUNS = "pipeline-runs"  # records of local pipeline runs (pipelines.local)

# Files of a checkpoint folder (written by hsissl.pretrain.trainer).
TRAIN_STATE = "train.pt"  # the resumable training state
ENCODER = "encoder.pt"  # the encoder record finetuning reads
HISTORY = "history.json"  # logged training metrics, for reports

# Files of a result folder.
METRICS = "metrics.json"  # the commit marker every result has
PREDICTIONS = "predictions.npz"  # example scene predictions (finetune, baseline)
HEAD = "head.pt"  # finetune's head record
MODEL = "model.pt"  # baseline's model record

# Files of a report folder.
REPORT_HTML = "report.html"
REPORT_MARKDOWN = "summary.md"


def _key(folder: str, name: str, file: str) -> str:
    return f"{folder}/{name}/{file}" if file else f"{folder}/{name}"


def dataset_key(name: str) -> str:
    """``datasets/<name>``."""
    return _key(DATASETS, name, "")


def checkpoint_key(name: str, file: str = "") -> str:
    """``checkpoints/<name>`` or a file in it (:data:`TRAIN_STATE`, :data:`ENCODER`, ...)."""
    return _key(CHECKPOINTS, name, file)


def result_key(name: str, file: str = "") -> str:
    """``results/<name>`` or a file in it (:data:`METRICS`, :data:`PREDICTIONS`, ...)."""
    return _key(RESULTS, name, file)


def report_key(name: str, file: str = "") -> str:
    """``reports/<name>`` or a file in it (:data:`REPORT_HTML`, :data:`REPORT_MARKDOWN`)."""
    return _key(REPORTS, name, file)


def checkpoint_name(method: str, base: str, run_id: str) -> str:
    """Checkpoint folder of one pretraining in a pipeline: one per method and pipeline run, so
    a retried pod resumes its own run's checkpoint while a new run (or a changed config) starts
    afresh; ``pretrain.name`` (``base``) set by the user names a line of runs to continue."""
    suffix = base or run_id
    return f"{method}-{suffix}" if suffix else method


def folder_name(key: str, folder: str) -> str | None:
    """``<name>`` of a key ``<folder>/<name>/<file>`` directly under ``folder``, else None."""
    parts = key.split("/")
    return parts[1] if len(parts) == 3 and parts[0] == folder else None


def split_dataset_uri(uri: str) -> tuple[str, str]:
    """``<store>/datasets/<name>`` -> (store URI, dataset name)."""
    root, sep, name = uri.rstrip("/").rpartition(f"/{DATASETS}/")
    if not sep or not name or "/" in name:
        raise ValueError(
            f"dataset URI {uri!r}: expected <artifact store>/{DATASETS}/<name> "
            "(what the ingest stage writes)"
        )
    return root, name


def default_store(run_dir: str | Path) -> Path:
    """The artifact store when ``storage.uri`` is empty: ``<run_dir>/artifacts``."""
    return Path(run_dir) / ARTIFACTS


def pipeline_runs(run_dir: str | Path) -> Path:
    """The folder of local pipeline-run records: ``<run_dir>/pipeline-runs``."""
    return Path(run_dir) / PIPELINE_RUNS


def run_dir_of(cfg: Config) -> Path:
    """The run folder, absolute, created if missing."""
    path = Path(cfg.run_dir).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def storage_of(cfg: Config) -> Storage:
    """The artifact store: ``storage.uri`` or ``<run_dir>/artifacts``."""
    return open_storage(cfg.storage.uri or str(default_store(run_dir_of(cfg))))


def dataset_uri(cfg: Config) -> str:
    """The URI of the dataset the config names: ``<store>/datasets/<data.name>``."""
    return storage_of(cfg).join(dataset_key(cfg.data.name))
