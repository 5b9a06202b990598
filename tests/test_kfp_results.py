"""Results where a KFP user looks: the confusion matrix on the run page, a report page even
when the report fails (with the pipeline's real state in MLflow), and encoders in the MLflow
Model Registry that finetuning takes as ``models:/…`` (loopback MLflow server + SeaweedFS S3).

KFP behaviour encoded: the run page draws a ``system.ClassificationMetrics`` artifact's
``confusionMatrix`` metadata (kfp 2.17 dsl/types/artifact_types.py writes it), and the launcher
publishes a task's output artifacts only when its command succeeded (backend 2.14+
backend/src/v2/component/launcher_v2.go: outputs are uploaded after the executor returns).
MLflow behaviour: 3.17 server's model-version source checks (server/handlers.py).
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path

import pytest
from kfp.dsl import HTML, ClassificationMetrics, Markdown
from mlflow.tracking import MlflowClient

from components import artifacts, references, report_task, runtime
from components.baseline_deeplabv3plus import baseline_deeplabv3plus
from components.finetune_heads import finetune_heads
from hsissl import registry
from hsissl.config import ConfigError, load_config
from hsissl.data.ohs import CLASS_NAMES
from hsissl.stages import finetune, ingest, pretrain
from hsissl.storage import open_storage
from hsissl.tracking import KFP_RUN_ENV, PARENT_RUN_ENV, Tracker

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """Lineage and tracking read and export these: keep each test to its own."""
    for name in (KFP_RUN_ENV, PARENT_RUN_ENV, "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    yield
    for name in (KFP_RUN_ENV, PARENT_RUN_ENV):
        os.environ.pop(name, None)


# -- the confusion matrix on the run page ---------------------------------------------------


def test_finetune_and_baseline_tasks_declare_a_classification_metrics_output() -> None:
    for component in (finetune_heads, baseline_deeplabv3plus):
        output = component.component_spec.outputs["confusion_matrix"]
        assert output.type == "system.ClassificationMetrics@0.0.1", component.name


def test_confusion_matrix_has_the_whu_ohs_classes_and_the_scene_counts(tmp_path) -> None:
    k = len(CLASS_NAMES)  # unlabelled + 24 classes, as hsissl.segment.metrics counts them
    matrix = [[(t * 7 + p) % 5 if t else 0 for p in range(k)] for t in range(k)]
    store = open_storage(str(tmp_path / "store"))
    store.put_bytes("results/finetune-mae-linear/metrics.json",
                    json.dumps({"scene": {"matrix": matrix}}).encode())  # fmt: skip
    artifact = ClassificationMetrics(name="confusion_matrix", uri=str(tmp_path / "kfp" / "cm"))

    artifacts.log_confusion(artifact, store.join("results/finetune-mae-linear"))

    spec = artifact.metadata["confusionMatrix"]
    assert [a["displayName"] for a in spec["annotationSpecs"]] == list(CLASS_NAMES[1:])
    assert [r["row"] for r in spec["rows"]] == [row[1:] for row in matrix[1:]]
    assert json.loads(Path(artifact.path).read_text()) == artifact.metadata  # kfp.local cache


# -- a failed report still gives a page, and MLflow the pipeline's state ---------------------


def _report(tmp_path: Path, tracking: str, kfp_run_id: str, state: str, *overrides: str):
    html = HTML(name="html", uri=str(tmp_path / kfp_run_id / "html"))
    markdown = Markdown(name="markdown", uri=str(tmp_path / kfp_run_id / "markdown"))
    common = [f"run_dir={tmp_path / 'run'}", f"tracking.experiment=report-{kfp_run_id}"]
    parent = runtime.open_lineage(str(TINY), common, tracking, kfp_run_id, "hsissl", {})
    os.environ.pop(KFP_RUN_ENV, None)
    os.environ.pop(PARENT_RUN_ENV, None)
    result = report_task.report(str(TINY), [*common, *overrides], str(tmp_path / "store"),
                                tracking, kfp_run_id, state, html, markdown)  # fmt: skip
    return result, html, markdown, MlflowClient(tracking).get_run(parent)


@pytest.mark.parametrize(("state", "mlflow_status"), [("SUCCEEDED", "FINISHED"),
                                                      ("FAILED", "FAILED")])  # fmt: skip
def test_a_failed_report_emits_a_page_and_keeps_the_pipelines_state(
    tmp_path, mlflow_server, state, mlflow_status
) -> None:
    kfp_run_id = f"rf-{uuid.uuid4().hex[:6]}"
    # an artifact store that is a file: the report fails after its config loaded (a bad
    # report.name is refused when any stage loads the config, before the pipeline runs)
    (tmp_path / "store").write_text("")
    result, html, markdown, parent = _report(tmp_path, mlflow_server, kfp_run_id, state)

    assert result["failed"] == "report" and markdown.metadata["failed"] == "report"
    page = Path(markdown.path).read_text()
    assert page.startswith("# hsissl report: the report failed")
    assert f"**Pipeline state**: `{state}`" in page
    assert "NotADirectoryError: [Errno 20] Not a directory" in page  # what failed
    assert f"run `{kfp_run_id}` → the exit task `report` → *Logs*" in page  # where the logs are
    assert f"parent run `{parent.info.run_id}` at {mlflow_server}" in page
    assert f"rerun --stage report --from-run {kfp_run_id}" in page
    assert "## Report traceback" in page and "Traceback (most recent call last)" in page
    assert "store/reports/report" in Path(html.path).read_text()
    assert "<pre>" in Path(html.path).read_text()
    assert parent.info.status == mlflow_status  # the pipeline's state, not the report's
    assert parent.data.tags["kfp_state"] == state
    assert parent.data.tags["report_state"] == "FAILED"
    assert "NotADirectoryError" in parent.data.tags["report_error"]


def test_a_working_report_is_unchanged(tmp_path, mlflow_server) -> None:
    kfp_run_id = f"ok-{uuid.uuid4().hex[:6]}"
    result, html, markdown, parent = _report(tmp_path, mlflow_server, kfp_run_id, "SUCCEEDED")
    assert "failed" not in result and "failed" not in markdown.metadata
    assert "the report failed" not in Path(markdown.path).read_text()
    assert Path(html.path).read_text().lstrip().lower().startswith("<!doctype html")
    assert parent.info.status == "FINISHED" and "report_state" not in parent.data.tags


# -- encoders in the MLflow Model Registry ---------------------------------------------------


def _cfg(tmp_path: Path, storage: str, tracking: str, prefix: str, *extra: str):
    values = {
        "run_dir": tmp_path / "run", "storage.uri": storage, "tracking.uri": tracking,
        "tracking.experiment": f"registry-{prefix}", "tracking.model_prefix": prefix,
        "synthetic.scenes": "{tr: 4, va: 1, ts: 1}", "synthetic.size": 64,
        "data.scene_size": 64, "pretrain.batch_size": 4, "pretrain.max_steps": 2,
        "pretrain.ckpt_every": 2, "pretrain.knn_tiles": 0, "pretrain.loader_threads": 1,
        "pretrain.device": "cpu", "mae.model": "mae_vit_tiny_patch8_64",
        "finetune.max_steps": 1, "finetune.batch_size": 4, "finetune.eval_scenes": 1,
        "finetune.loader_threads": 1, "finetune.head": "linear",
    }  # fmt: skip
    return load_config(TINY, [*(f"{k}={v}" for k, v in values.items()), *extra])


def test_encoders_are_registered_per_run_and_finetune_takes_models_uris(
    tmp_path, s3_bucket, mlflow_server, monkeypatch
) -> None:
    prefix = f"t{uuid.uuid4().hex[:6]}-"
    storage = f"{s3_bucket}/store"
    monkeypatch.setenv("HSISSL_GIT_SHA", "0123abcd")
    manifest = ingest.run(_cfg(tmp_path, storage, mlflow_server, prefix)).manifest
    encoders = []
    for run_id in ("kfp-a", "kfp-b"):  # two pipeline runs: two versions of one model
        monkeypatch.setenv("KFP_RUN_ID", run_id)
        cfg = _cfg(tmp_path, storage, mlflow_server, prefix, f"pretrain.name=mae-{run_id}")
        encoders.append(pretrain.run(cfg, "mae").encoder_uri)
    monkeypatch.delenv("KFP_RUN_ID")

    client = MlflowClient(mlflow_server)
    name = f"{prefix}mae"
    versions = sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: v.version)
    assert [v.source for v in versions] == encoders  # the store's records, s3://…
    assert encoders[0].startswith(storage) and encoders[0] != encoders[1]
    for version, run_id in zip(versions, ("kfp-a", "kfp-b"), strict=True):
        assert version.tags["normalizer"] == manifest["normalizer"]["fingerprint"]
        assert version.tags["git_sha"] == "0123abcd" and version.tags["kfp_run_id"] == run_id
        assert version.tags["method"] == "mae" and version.tags["step"] == "2"
        run = client.get_run(version.run_id)  # linked to the pretraining's MLflow run
        assert run.data.tags["stage"] == "pretrain-mae"
        assert run.data.tags["registered_model"] == f"models:/{name}/{version.version}"

    client.set_registered_model_alias(name, "champion", versions[0].version)
    cfg = _cfg(
        tmp_path, storage, mlflow_server, prefix, f"finetune.encoder=models:/{name}@champion"
    )
    result = finetune.run(cfg)
    metrics = json.loads(open_storage(result.results_uri).get_bytes("metrics.json"))
    assert metrics["encoder"]["uri"] == encoders[0]  # the version the alias names
    (run,) = client.search_runs([client.get_experiment_by_name(f"registry-{prefix}").experiment_id],
                                filter_string="tags.stage = 'finetune'")  # fmt: skip
    assert run.data.tags["encoder_model"] == f"models:/{name}/{versions[0].version}"

    assert registry.resolve(f"models:/{name}/{versions[1].version}", mlflow_server)["source"] \
        == encoders[1]  # fmt: skip
    assert registry.resolve(f"models:/{name}/latest", mlflow_server)["source"] == encoders[1]
    with pytest.raises(ConfigError, match=r"has versions \[1, 2\] and aliases \['champion'\]"):
        registry.resolve(f"models:/{name}/9", mlflow_server)
    with pytest.raises(ConfigError, match=r"registered models: \["):
        registry.resolve(f"models:/{prefix}nope@champion", mlflow_server)
    # what the stage pipeline's encoder-ref task passes on
    ref = references.reference(f"models:/{name}@champion", _Artifact(tmp_path / "ref"), "encoder")
    assert ref == f"models:/{name}@champion"


class _Artifact:
    def __init__(self, path: Path) -> None:
        self.path, self.metadata, self.name = str(path), {}, "encoder"


def test_malformed_models_uris_and_rewritten_checkpoints_are_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a closed port: fail at once
    with pytest.raises(ConfigError, match=r"registry at http://127.0.0.1:9\): the registry "
                       r"could not be read .*tracking.uri"):  # fmt: skip
        registry.resolve("models:/hsissl-mae/1", "http://127.0.0.1:9")
    for uri in ("models:/", "models:/mae", "models:/mae/v1", "models:/mae@"):
        with pytest.raises(ConfigError, match="expected models:/<name>/<version>"):
            registry.parse(uri)
    with pytest.raises(ConfigError, match="expected models:/<name>/<version>"):
        references.reference("models:/mae", _Artifact(tmp_path / "ref"), "encoder")
    registered = {"uri": "models:/hsissl-mae/3", "source": "s3://b/checkpoints/mae/encoder.pt",
                  "version": "3", "step": "1000"}  # fmt: skip
    registry.check_step(registered, 1000)
    with pytest.raises(ConfigError, match=r"now at step 2000, but version 3 was registered at "
                       r"step 1000"):  # fmt: skip
        registry.check_step(registered, 2000)


def test_a_local_store_behind_a_server_is_not_registered_and_says_why(
    tmp_path, mlflow_server, caplog
) -> None:
    client = MlflowClient(mlflow_server)
    experiment = client.create_experiment(f"local-{uuid.uuid4().hex[:6]}")
    run = client.create_run(experiment)
    tracker = Tracker(client, run.info.run_id, "pretrain-mae", mlflow_server)
    cfg = load_config(TINY, [f"tracking.model_prefix=l{uuid.uuid4().hex[:6]}-"])
    with caplog.at_level(logging.WARNING, logger="hsissl.registry"):
        uri = registry.register_encoder(tracker, cfg, "mae", str(tmp_path / "encoder.pt"),
                                        "fp", 2, str(tmp_path / "datasets/x"))  # fmt: skip
    assert uri is None
    assert "only registers encoders in an object store" in caplog.text
    off = load_config(TINY, ["tracking.model_prefix="])
    assert registry.register_encoder(tracker, off, "mae", "s3://b/e.pt", "fp", 2, "") is None
