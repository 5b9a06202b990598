"""What every component does inside its pod: config, lineage, the stage call, artifact pointers.

This module never imports kfp or kubernetes: it runs in the stage images and under
``kfp.local``, and each component's body is a few lines calling one function here. Artifacts
are pointers: their metadata (and a small JSON file at ``artifact.path``) hold the
object-store URI of the real data, which stays in the artifact store.

Config for a stage = preset <- the pipeline's ``overrides`` <- the wiring the pipeline owns
(dataset and encoder URIs, storage, tracking, source, epochs), so the wiring always wins.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

log = logging.getLogger("hsissl.components")

KFP_RUN_ENV = "KFP_RUN_ID"  # set from the pod label pipeline/runid, or by the local runner
# Set by the KFP backend in every step's executor container (argocompiler/common.go commonEnvs,
# 2.14-2.17), never by kfp.local: tells a cluster step from a local run.
KFP_POD_ENV = "KFP_POD_NAME"
PARENT_RUN_ENV = "HSISSL_PARENT_RUN_ID"  # read by hsissl.tracking: nests stage runs
CONFIG_DIR_ENV = "HSISSL_CONFIG_DIR"
GPUS_ENV = "HSISSL_GPUS"  # processes per pod for torchrun; default: visible CUDA devices
PIPELINE_ROLE = {"hsissl_role": "pipeline"}  # tag of the MLflow parent run of a pipeline run
POINTER_FILE_LIMIT = 4096  # a pointer file larger than this is not a pointer


def setup_logging() -> None:
    """INFO logs of the library in the pod log (only inside a KFP component process)."""
    if os.environ.get("_KFP_RUNTIME"):  # set by the KFP component command
        logging.basicConfig(level=logging.INFO, force=True,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip


# -- config ------------------------------------------------------------------------------


def config_dirs() -> list[Path]:
    """Where a preset given by name (``tiny``) is looked up, in order."""
    dirs = [Path(os.environ[CONFIG_DIR_ENV])] if os.environ.get(CONFIG_DIR_ENV) else []
    return [
        *dirs,
        Path.cwd() / "configs",
        Path("/app/configs"),
        Path(__file__).parents[1] / "configs",
    ]


def resolve_preset(preset: str) -> Path | None:
    """A preset path (``/etc/hsissl/config.yaml``), a name (``tiny``), or "" for the defaults."""
    from hsissl.config import ConfigError

    if not preset:
        return None
    path = Path(preset).expanduser()
    if path.is_file():
        return path
    if path.suffix not in (".yaml", ".yml") and "/" not in preset:
        for folder in config_dirs():
            if (folder / f"{preset}.yaml").is_file():
                return folder / f"{preset}.yaml"
    raise ConfigError(
        f"config preset {preset!r}: no such file, and no {preset}.yaml in "
        f"{', '.join(str(d) for d in config_dirs())}"
    )


def override(key: str, value: Any) -> str:
    """``key=value`` with the value JSON-encoded (valid YAML), so URIs and paths parse as given."""
    return f"{key}={json.dumps(value)}"


def managed_overrides(wiring: dict[str, Any]) -> list[str]:
    """``wiring`` as ``key=value`` overrides; entries whose value is None or "" are left out."""
    return [override(k, v) for k, v in wiring.items() if v not in (None, "")]


def stage_config(preset: str, overrides: list[str], wiring: dict[str, Any] | None = None):
    """The stage's Config; ``wiring`` entries whose value is None or "" are left out."""
    from hsissl.config import load_config

    return load_config(resolve_preset(preset), [*overrides, *managed_overrides(wiring or {})])


def dataset_wiring(dataset_uri: str) -> dict[str, str]:
    """``<root>/datasets/<name>`` -> storage root and dataset name, so a stage reads exactly it."""
    root, sep, name = dataset_uri.rstrip("/").rpartition("/datasets/")
    if not sep or not name or "/" in name:
        raise ValueError(
            f"dataset URI {dataset_uri!r}: expected <artifact store>/datasets/<name> "
            "(what the ingest stage writes)"
        )
    return {"storage.uri": root, "data.name": name}


def run_id(fallback: str = "") -> str:
    """This pipeline run's id: $KFP_RUN_ID (pod label or local runner), else ``fallback``."""
    return os.environ.get(KFP_RUN_ENV) or fallback


def checkpoint_name(method: str, base: str, kfp_run_id: str) -> str:
    """Checkpoint folder of one pretraining: one per method and pipeline run, so a retried pod
    resumes its own run's checkpoint while a new run (or a changed config) starts afresh;
    ``pretrain.name`` set by the user names a line of runs to continue instead."""
    suffix = base or kfp_run_id
    return f"{method}-{suffix}" if suffix else method


# -- lineage (one MLflow parent run per pipeline run) -------------------------------------


def _client(cfg) -> tuple[Any, str]:
    from mlflow.tracking import MlflowClient

    from hsissl import tracking

    uri = tracking.resolve_uri(cfg.tracking.uri, cfg.run_dir)
    client = MlflowClient(tracking_uri=uri)
    return client, tracking.experiment_id(client, cfg.tracking.experiment, uri)


def find_parent_run(cfg, kfp_run_id: str) -> str | None:
    """The MLflow parent run of pipeline run ``kfp_run_id``, if one was opened."""
    client, experiment = _client(cfg)
    ((key, value),) = PIPELINE_ROLE.items()
    runs = client.search_runs(
        [experiment],
        filter_string=f"tags.kfp_run_id = '{kfp_run_id}' and tags.{key} = '{value}'",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def open_lineage(preset: str, overrides: list[str], tracking_uri: str, kfp_run_id: str,
                 pipeline: str, params: dict[str, Any]) -> str:  # fmt: skip
    """Create (or find, when retried) the parent run; returns its id."""
    from mlflow.entities import Param

    from hsissl import tracking

    setup_logging()
    cfg = stage_config(preset, overrides, {"tracking.uri": tracking_uri})
    kfp_run_id = run_id(kfp_run_id)
    existing = find_parent_run(cfg, kfp_run_id)
    if existing:
        return existing
    client, experiment = _client(cfg)
    tags = {"kfp_run_id": kfp_run_id, "pipeline": pipeline, **PIPELINE_ROLE}
    sha = tracking.git_sha()
    if sha:
        tags["git_sha"] = sha
    run = client.create_run(experiment, run_name=f"{pipeline} {kfp_run_id}", tags=tags)
    client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    log.info("MLflow parent run %s for pipeline run %s", run.info.run_id, kfp_run_id)
    return run.info.run_id


def join_lineage(cfg, kfp_run_id: str = "") -> str | None:
    """Point $HSISSL_PARENT_RUN_ID at this pipeline run's parent run (found by its KFP run id)."""
    if os.environ.get(PARENT_RUN_ENV):
        return os.environ[PARENT_RUN_ENV]
    kfp_run_id = run_id(kfp_run_id)
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


def close_lineage(preset: str, overrides: list[str], tracking_uri: str, kfp_run_id: str,
                  state: str) -> str | None:  # fmt: skip
    """End the parent run as the pipeline's final ``state`` says (``hsissl.pipeline_state``:
    COMPLETE/SUCCEEDED finished, FAILED/CANCELED/SYSTEM_ERROR failed, else tagged unknown);
    returns its id."""
    from hsissl.pipeline_state import pipeline_outcome

    cfg = stage_config(preset, overrides, {"tracking.uri": tracking_uri})
    parent = join_lineage(cfg, kfp_run_id)
    if parent:
        client, _ = _client(cfg)
        outcome = pipeline_outcome(state)
        for key, value in outcome.tags(state).items():
            client.set_tag(parent, key, value)
        client.set_terminated(parent, outcome.mlflow_status)
    return parent


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

    metrics = json.loads(fetch(f"{results_uri.rstrip('/')}/metrics.json"))
    matrix = metrics["scene"]["matrix"]
    ids = range(1, len(matrix))
    names = [CLASS_NAMES[i] if i < len(CLASS_NAMES) else f"class {i}" for i in ids]
    confusion.log_confusion_matrix(names, [[int(matrix[t][p]) for p in ids] for t in ids])
    path = Path(confusion.path)  # a file, as for Metrics (kfp.local's cache wants one)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(confusion.metadata)))


def first_uri(result: dict[str, Any], keys: tuple[str, ...], stage: str) -> str:
    for key in keys:
        if result.get(key):
            return str(result[key])
    raise KeyError(
        f"stage {stage} returned no output URI: expected one of {keys}, got {sorted(result)}"
    )


def fetch(uri: str) -> bytes:
    """Bytes of the object at ``uri`` (file path, file:// or s3://)."""
    from hsissl.storage import open_storage

    parent, _, name = uri.rstrip("/").rpartition("/")
    return open_storage(parent).get_bytes(name)


# -- stages -------------------------------------------------------------------------------


def call_stage(module: str, cfg, kfp_run_id: str = "", **kwargs: Any) -> dict[str, Any]:
    """``hsissl.stages.<module>.run(cfg, **kwargs)`` nested under the pipeline's MLflow parent run."""
    join_lineage(cfg, kfp_run_id)
    return importlib.import_module(f"hsissl.stages.{module}").run(cfg, **kwargs)


EMPTY_SOURCE_ON_CLUSTER = (
    "source is empty: on a cluster, name the data: source=s3://<bucket>/<prefix> (WHU-OHS "
    "uploaded to the object store, e.g. s3://hsissl/WHU-OHS), a folder in the pod mounted with "
    "--data-pvc (source=/data/WHU-OHS), or source=generated for the small generated dataset"
)


def check_source(source: str) -> None:
    """In a KFP backend step an empty ``source`` is a mistake (a UI run with the default), not
    a request for the generated dataset: that one is asked for by name. Under kfp.local (also
    in a notebook pod) "" stays the generated dataset, as ``make run`` uses it."""
    if not source.strip() and os.environ.get(KFP_POD_ENV):
        raise ValueError(EMPTY_SOURCE_ON_CLUSTER)


def check_claim(data_pvc: str, mounted: bool) -> None:
    """A ``data_pvc`` run parameter on a pipeline compiled without ``--data-pvc`` mounts
    nothing: say so instead of failing later on a missing folder."""
    if data_pvc and not mounted:
        raise ValueError(
            f"data_pvc={data_pvc!r}, but this pipeline was compiled without --data-pvc, so no "
            "claim is mounted; compile (or upload) with --data-pvc <any claim> to choose the "
            "claim per run, or put the data in the object store and pass source=s3://<bucket>/"
            "<prefix>"
        )


def ingest(source: str, preset: str, overrides: list[str], storage_uri: str, tracking_uri: str,
           dataset: Any) -> dict[str, Any]:  # fmt: skip
    setup_logging()
    check_source(source)
    cfg = stage_config(preset, overrides, {"data.source": source, "storage.uri": storage_uri,
                                           "tracking.uri": tracking_uri})  # fmt: skip
    result = call_stage("ingest", cfg)
    manifest = result["manifest"]
    publish(dataset, result["dataset_uri"], {
        "fingerprint": manifest["fingerprint"], "created": manifest["created"],
        "normalizer": manifest["normalizer"]["fingerprint"], "reused": result["reused"],
        "tiles": {split: info["tiles"] for split, info in manifest["splits"].items()},
    })  # fmt: skip
    return result


def pretrain_config(method: str, dataset: Any, preset: str, overrides: list[str],
                    tracking_uri: str, epochs: float, max_steps: int,
                    kfp_run_id: str) -> tuple[Any, dict[str, Any]]:  # fmt: skip
    """The Config of pretraining ``method`` on ``dataset`` and the wiring that made it, with
    ``pretrain.name`` = this run's checkpoint folder (shared by the single pod and the
    multi-node PyTorchJob, so both write to ``checkpoints/<method>-<run id>/``)."""
    wiring = {**dataset_wiring(uri_of(dataset)), "tracking.uri": tracking_uri,
              "pretrain.epochs": epochs if epochs > 0 else None,
              "pretrain.max_steps": max_steps if max_steps > 0 else None}  # fmt: skip
    base = stage_config(preset, overrides, wiring)
    wiring["pretrain.name"] = checkpoint_name(method, base.pretrain.name, run_id(kfp_run_id))
    return stage_config(preset, overrides, wiring), wiring


def publish_pretrain(method: str, result: dict[str, Any], encoder: Any, metrics: Any) -> None:
    """The outputs of a pretraining (one pod or a PyTorchJob): the encoder record's URI with
    method/steps/resumed, and the final training metrics."""
    publish(encoder, result["encoder_uri"], {"method": method, "steps": result.get("steps", 0),
                                             "resumed": result.get("resumed", False)})  # fmt: skip
    log_metrics(metrics, {"steps": result.get("steps", 0), **result.get("metrics", {})})


def pretrain(method: str, dataset: Any, preset: str, overrides: list[str], tracking_uri: str,
             epochs: float, max_steps: int, kfp_run_id: str, encoder: Any, metrics: Any) -> dict:  # fmt: skip
    """Pretrain ``method`` (hsissl.methods); with several GPUs in the pod, under torchrun."""
    setup_logging()
    cfg, wiring = pretrain_config(method, dataset, preset, overrides, tracking_uri, epochs,
                                  max_steps, kfp_run_id)  # fmt: skip
    procs = processes_per_pod()
    if procs > 1:
        result = _torchrun(f"pretrain-{method}", preset, overrides, wiring, procs, cfg, kfp_run_id)
    else:
        result = call_stage("pretrain", cfg, kfp_run_id, method=method)
    publish_pretrain(method, result, encoder, metrics)
    return result


def stored_pretrain_result(cfg, resumed: bool) -> dict[str, Any]:
    """What a pretraining that ran elsewhere (a multi-node PyTorchJob) left in the store, in
    the form ``hsissl.stages.pretrain.run`` returns: the encoder URI, the steps and the last
    logged metrics from ``history.json`` (the final k-NN probe is only in its MLflow run)."""
    from hsissl.stages.common import storage_of

    store = storage_of(cfg)
    prefix = f"checkpoints/{cfg.pretrain.name}"
    if not store.exists(f"{prefix}/encoder.pt"):
        raise FileNotFoundError(
            f"{store.join(prefix + '/encoder.pt')} does not exist: the pretraining finished "
            "without writing its encoder record (expected from hsissl.pretrain.trainer)"
        )
    history = []
    if store.exists(f"{prefix}/history.json"):
        history = json.loads(store.get_bytes(f"{prefix}/history.json"))
    else:
        log.warning("%s missing: no training metrics", store.join(f"{prefix}/history.json"))
    last = dict(history[-1]) if history else {}
    steps = int(last.pop("step", 0))
    return {"encoder_uri": store.join(f"{prefix}/encoder.pt"), "steps": steps, "metrics": last,
            "resumed": resumed}  # fmt: skip


def processes_per_pod() -> int:
    if os.environ.get(GPUS_ENV):
        return int(os.environ[GPUS_ENV])
    try:
        import torch

        return max(1, torch.cuda.device_count())
    except ImportError:  # pragma: no cover - the images always carry torch
        return 1


def torchrun_command(stage: str, preset: str, overrides: list[str], wiring: dict[str, Any],
                     procs: int) -> list[str]:  # fmt: skip
    """One pod, ``procs`` processes (one per GPU): torchrun running ``hsissl <stage>``."""
    preset_path = resolve_preset(preset)
    config = ["--config", str(preset_path)] if preset_path else []
    managed = managed_overrides(wiring)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={procs}", "-m", "hsissl.cli", stage, *config, *overrides, *managed]  # fmt: skip


def _torchrun(stage: str, preset: str, overrides: list[str], wiring: dict[str, Any], procs: int,
              cfg, kfp_run_id: str) -> dict[str, Any]:  # fmt: skip
    from hsissl.stages.common import storage_of

    join_lineage(cfg, kfp_run_id)  # the env reaches rank 0's tracked run
    subprocess.run(torchrun_command(stage, preset, overrides, wiring, procs), check=True)
    store = storage_of(cfg)
    return {"encoder_uri": store.join(f"checkpoints/{cfg.pretrain.name}/encoder.pt")}


def finetune(dataset: Any, encoder: Any, head: str, preset: str, overrides: list[str],
             tracking_uri: str, model: Any, metrics: Any,
             confusion: Any = None) -> dict[str, Any]:  # fmt: skip
    """One head on one frozen encoder (or on a random-init one: ``random:<factory>``);
    ``confusion``: a ClassificationMetrics artifact for the whole-scene confusion matrix."""
    setup_logging()
    cfg = stage_config(preset, overrides, {**dataset_wiring(uri_of(dataset)),
                                           "tracking.uri": tracking_uri,
                                           "finetune.encoder": uri_of(encoder),
                                           "finetune.head": head})  # fmt: skip
    result = call_stage("finetune", cfg)
    uri = first_uri(result, ("results_uri", "head_uri"), "finetune-heads")
    publish(model, uri, {"head": cfg.finetune.head, "encoder": cfg.finetune.encoder,
                         "name": result.get("name", "")})  # fmt: skip
    log_metrics(metrics, result)
    if confusion is not None:
        log_confusion(confusion, first_uri(result, ("results_uri",), "finetune-heads"))
    return result


def evaluate(module: str, stage: str, dataset: Any, preset: str, overrides: list[str],
             tracking_uri: str, model: Any, metrics: Any,
             confusion: Any = None) -> dict[str, Any]:  # fmt: skip
    """A stage that reads the dataset and writes results: baseline, pca_poc (``confusion``:
    see :func:`finetune`)."""
    setup_logging()
    cfg = stage_config(preset, overrides, {**dataset_wiring(uri_of(dataset)),
                                           "tracking.uri": tracking_uri})  # fmt: skip
    result = call_stage(module, cfg)
    publish(model, first_uri(result, ("results_uri", "results"), stage))
    log_metrics(metrics, result)
    if confusion is not None:
        log_confusion(confusion, first_uri(result, ("results_uri",), stage))
    return result


def report(preset: str, overrides: list[str], storage_uri: str, tracking_uri: str,
           kfp_run_id: str, state: str, html: Any, markdown: Any) -> dict[str, Any]:  # fmt: skip
    """The report over everything in the store, then the parent run closed with ``state``, the
    pipeline's own state, whatever happened to the report. If the report fails (or MLflow
    cannot be told), the task still succeeds and its outputs are a page saying what failed
    and where the logs are (``components.report_failure``): a failed report must neither
    hide the run page nor turn a successful pipeline into a failed one."""
    setup_logging()
    result: dict[str, Any] = {}
    report_error: Exception | None = None
    try:
        cfg = stage_config(
            preset, overrides, {"storage.uri": storage_uri, "tracking.uri": tracking_uri}
        )
        result = call_stage("report", cfg, kfp_run_id)
        html_uri = first_uri(result, ("html_uri", "report_uri", "html"), "report")
        md_uri = first_uri(result, ("markdown_uri", "summary_uri", "markdown"), "report")
        for artifact, uri in ((html, html_uri), (markdown, md_uri)):
            Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
            Path(artifact.path).write_bytes(fetch(uri))  # the KFP UI renders the content itself
            artifact.metadata["uri"] = uri
    except Exception as exc:
        log.exception("the report failed; the pipeline's state (%s) still goes to MLflow", state)
        report_error = exc
    except BaseException:  # interrupted: still the pipeline's state, not the report's
        with contextlib.suppress(Exception):  # keep the interruption, not a closing error
            close_lineage(preset, overrides, tracking_uri, kfp_run_id, state)
        raise
    parent, lineage_error = None, None
    try:
        parent = close_lineage(preset, overrides, tracking_uri, kfp_run_id, state)
        if parent and report_error is not None:
            cfg = stage_config(preset, overrides, {"tracking.uri": tracking_uri})
            client, _ = _client(cfg)
            client.set_tag(parent, "report_state", "FAILED")
            client.set_tag(parent, "report_error", f"{type(report_error).__name__}: "
                           f"{report_error}"[:5000])  # fmt: skip
    except Exception as exc:
        log.exception("MLflow parent run of %s not closed", kfp_run_id)
        lineage_error = exc
    if report_error is not None or lineage_error is not None:
        from components.report_failure import failure_html, failure_markdown

        page = failure_markdown(state=state, kfp_run_id=run_id(kfp_run_id),
                                storage_uri=storage_uri, tracking_uri=tracking_uri,
                                parent_run=parent, report_error=report_error,
                                lineage_error=lineage_error)  # fmt: skip
        if report_error is None:  # the report is there: the note goes under it
            page = Path(markdown.path).read_text() + "\n---\n\n" + page
        for artifact, text in ((markdown, page), (html, failure_html(page))):
            if report_error is not None or artifact is markdown:
                Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
                Path(artifact.path).write_text(text)
        markdown.metadata["failed"] = "report" if report_error is not None else "mlflow"
        result = {**result, "failed": markdown.metadata["failed"]}
    return result


def reference(uri: str, artifact: Any, kind: str) -> str:
    """An existing dataset/encoder in the store as an artifact; checks that it exists. A
    registered encoder (``models:/<name>/<version>``, ``models:/<name>@<alias>``) is passed on
    as it is: finetune resolves it against its own tracking URI and checks it there."""
    if kind == "encoder" and uri.startswith("models:/"):
        from hsissl import registry

        registry.parse(uri)  # a malformed one fails here, before any GPU pod starts
    elif not uri.startswith("random:"):
        from hsissl.storage import open_storage

        target = f"{uri.rstrip('/')}/manifest.json" if kind == "dataset" else uri
        parent, _, name = target.rpartition("/")
        if not open_storage(parent).exists(name):
            raise FileNotFoundError(f"{kind} {uri}: {target} does not exist in the artifact store")
    publish(artifact, uri, {"kind": kind})
    return uri


def dataset_ref(uri: str, preset: str, overrides: list[str], storage_uri: str, dataset: Any) -> str:
    """``uri``, or the dataset the config names (``<storage>/datasets/<data.name>``)."""
    setup_logging()
    if not uri:
        from hsissl.stages.common import dataset_uri

        uri = dataset_uri(stage_config(preset, overrides, {"storage.uri": storage_uri}))
    return reference(uri, dataset, "dataset")


def encoder_ref(uri: str, preset: str, overrides: list[str], storage_uri: str, method: str,
                source_run_id: str, encoder: Any) -> str:  # fmt: skip
    """``uri`` (an encoder record, ``random:<factory>``, or ``random`` = a random init of the
    config's MAE architecture), or the encoder that pretraining ``method`` wrote in pipeline
    run ``source_run_id``."""
    setup_logging()
    if uri == "random":  # the control: a random init of the architecture MAE pretrains
        from hsissl import methods

        cfg = stage_config(preset, overrides, {"storage.uri": storage_uri})
        uri = f"random:{cfg.mae.model or methods.get('mae').default_model}"
    if not uri:
        from hsissl.stages.common import storage_of

        cfg = stage_config(preset, overrides, {"storage.uri": storage_uri})
        name = checkpoint_name(method, cfg.pretrain.name, source_run_id)
        uri = storage_of(cfg).join(f"checkpoints/{name}/encoder.pt")
    return reference(uri, encoder, "encoder")
