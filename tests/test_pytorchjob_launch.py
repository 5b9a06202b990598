"""The launch-pytorchjob task (multi-node pretraining inside the DAG) against a loopback
Kubernetes API that plays the Training Operator v1 (``tests/fake_kube.py``); the cluster serves
only PyTorchJob here, so discovery picks it. TrainJob: ``tests/test_trainjob_launch.py``.
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from kfp.dsl import Dataset, Metrics, Model

from components import ingest_task, runtime
from components.jobs import launcher
from components.jobs.pytorchjob import validate
from components.options import PipelineOptions, Resources
from fake_kube import FakeOperator, api_for, condition, kubeconfig, serve
from hsissl.pretrain import checkpoint
from hsissl.storage import open_storage
from hsissl.tracking import KFP_RUN_ENV, PARENT_RUN_ENV

REPO = Path(__file__).resolve().parents[1]
STEPS = 4


@pytest.fixture
def operator():
    fake, server = serve(("pytorchjob",))
    yield fake
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def clean_env():
    """join_lineage exports the run id (fine in a pod): keep it from leaking between tests."""
    saved = dict(os.environ)
    for key in (KFP_RUN_ENV, PARENT_RUN_ENV):
        os.environ.pop(key, None)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def stage(tmp_path_factory) -> SimpleNamespace:
    """A tiny ingested dataset in a local store, and the pipeline arguments of a pretraining."""
    root = tmp_path_factory.mktemp("launch")
    values = {
        "run_dir": root / "run", "synthetic.scenes": "{tr: 4, va: 1, ts: 1}", "synthetic.size": 64,
        "data.scene_size": 64, "pretrain.batch_size": 4, "pretrain.max_steps": STEPS,
        "pretrain.ckpt_every": 2, "pretrain.log_every": 1, "pretrain.knn_tiles": 0,
        "pretrain.deterministic": "true", "pretrain.loader_threads": 1, "pretrain.device": "cpu",
        "mae.model": "mae_vit_tiny_patch8_64",
    }  # fmt: skip
    args = SimpleNamespace(preset=str(REPO / "configs" / "tiny.yaml"),
                           overrides=[f"{k}={v}" for k, v in values.items()],
                           storage=str(root / "store"),
                           tracking=f"sqlite:///{root / 'mlflow.db'}")  # fmt: skip
    dataset = Dataset(name="dataset", uri=str(root / "kfp" / "dataset"), metadata={})
    ingest_task.ingest("", args.preset, args.overrides, args.storage, args.tracking, dataset)
    args.dataset, args.root = dataset, root
    return args


def outputs(where: Path) -> tuple[Model, Metrics]:
    return (Model(name="encoder", uri=str(where / "encoder"), metadata={}),
            Metrics(name="metrics", uri=str(where / "metrics")))  # fmt: skip


def launch(stage: SimpleNamespace, operator: FakeOperator, run_id: str, *, nodes: int = 2,
           timeout_s: float = 120.0, namespace: str = "team-a",
           opts: PipelineOptions | None = None) -> tuple[Model, Metrics]:  # fmt: skip
    encoder, metrics = outputs(stage.root / "kfp" / run_id)
    options = (opts or PipelineOptions()).to_json()
    request = launcher.LaunchRequest("mae", stage.dataset, stage.preset, stage.overrides,
                                     stage.tracking, 0.0, 0, run_id, nodes, 4, "nvidia.com/gpu",
                                     options, namespace, timeout_s)  # fmt: skip
    launcher.launch(request, encoder, metrics, api=api_for(operator.host), poll_s=0.2)
    return encoder, metrics


def job_of(name: str, namespace: str = "team-a", kind: str = "PyTorchJob") -> dict[str, Any]:
    api_version = "kubeflow.org/v1" if kind == "PyTorchJob" else "trainer.kubeflow.org/v1alpha1"
    return {"apiVersion": api_version, "kind": kind,
            "metadata": {"name": name, "namespace": namespace}, "spec": {}}  # fmt: skip


def store_a_finished_pretraining(stage: SimpleNamespace, name: str) -> None:
    """What a finished job leaves: the encoder record and the loss history."""
    store = open_storage(stage.storage)
    store.put_bytes(f"checkpoints/{name}/encoder.pt", b"an encoder record")
    history = [{"step": 2, "loss": 0.9, "lr": 1e-3}, {"step": STEPS, "loss": 0.5, "lr": 2e-4}]
    store.put_bytes(f"checkpoints/{name}/history.json", json.dumps(history).encode())


# -- the job, and outputs equal to the single pod's ----------------------------------------


def test_launcher_creates_a_valid_job_waits_and_emits_what_the_single_pod_emits(stage, operator):
    encoder, metrics = launch(stage, operator, "multi-1")

    (job,) = operator.posted
    validate(job)  # the PyTorchJob schema and every pod template against the Kubernetes API
    assert job["metadata"] == {"name": "mae-multi-1", "namespace": "team-a", "labels": {
        "app.kubernetes.io/part-of": "hsissl", "hsissl.io/stage": "pretrain-mae"}}  # fmt: skip
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"]) == (1, 1)
    assert job["spec"]["nprocPerNode"] == "4"
    pod = replicas["Worker"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert pod["serviceAccountName"] == "hsissl-pipeline"
    assert container["image"] == PipelineOptions().train_image
    command = container["command"]
    assert command[:6] == ["torchrun", "-m", "hsissl.cli", "pretrain-mae", "--config", stage.preset]
    assert command[6 : 6 + len(stage.overrides)] == stage.overrides  # then the pipeline's wiring
    wiring = command[6 + len(stage.overrides) :]
    store_root = stage.dataset.metadata["uri"].rpartition("/datasets/")[0]  # the dataset's store
    assert f"storage.uri={json.dumps(store_root)}" in wiring
    assert 'data.name="whu-ohs"' in wiring and 'pretrain.name="mae-multi-1"' in wiring
    assert {"name": "KFP_RUN_ID", "value": "multi-1"} in container["env"]

    # the single pod on the same data and config, other run id
    os.environ.pop(KFP_RUN_ENV)  # the launcher exported its run id, as a pod would
    single, single_metrics = outputs(stage.root / "kfp" / "single-1")
    runtime.pretrain("mae", stage.dataset, stage.preset, stage.overrides, stage.tracking, 0.0, 0,
                     "single-1", single, single_metrics)  # fmt: skip
    store = open_storage(stage.storage)
    assert encoder.metadata["uri"] == store.join("checkpoints/mae-multi-1/encoder.pt")
    assert single.metadata["uri"] == store.join("checkpoints/mae-single-1/encoder.pt")
    assert {k: v for k, v in encoder.metadata.items() if k != "uri"} == {
        k: v for k, v in single.metadata.items() if k != "uri"
    } == {"method": "mae", "steps": float(STEPS), "resumed": "false"}  # fmt: skip
    assert json.loads(Path(encoder.path).read_text()) == encoder.metadata  # the pointer file
    assert set(metrics.metadata) == set(single_metrics.metadata) >= {"steps", "loss", "lr"}
    assert metrics.metadata["steps"] == single_metrics.metadata["steps"] == STEPS
    assert metrics.metadata["loss"] == pytest.approx(single_metrics.metadata["loss"], rel=1e-4)
    assert json.loads(Path(metrics.path).read_text()) == metrics.metadata
    model, _, record = checkpoint.load_model(encoder.metadata["uri"])  # what finetune loads
    assert record["step"] == STEPS and record["method"] == "mae"


# -- failures, retries, timeouts --------------------------------------------------------------


def test_a_failed_job_raises_an_error_naming_it_and_the_operators_reason(stage, operator):
    operator.outcome = "fail"
    operator.failure = ("BackoffLimitExceeded", "PyTorchJob mae-fail-1 has failed because it "
                        "has reached the specified backoff limit")  # fmt: skip
    with pytest.raises(launcher.PyTorchJobError, match=r"team-a/mae-fail-1: BackoffLimitExceeded: "
                       r"PyTorchJob mae-fail-1 has failed .* backoff limit .*kubectl -n team-a "
                       r"logs mae-fail-1-master-0"):  # fmt: skip
        launch(stage, operator, "fail-1")
    assert operator.calls("DELETE") == []  # left for kubectl describe / logs


def test_a_retried_task_adopts_the_job_it_created_instead_of_failing_with_409(stage, operator):
    store_a_finished_pretraining(stage, "mae-adopt-1")
    key = operator.add(job_of("mae-adopt-1"), condition("Running"))
    threading.Timer(0.5, operator.set, (key, condition("Succeeded"))).start()

    encoder, metrics = launch(stage, operator, "adopt-1")

    assert [status for m, _, status in operator.requests if m == "POST"] == [409]
    assert operator.calls("DELETE") == [] and len(operator.job_calls("GET")) >= 2  # waited
    assert encoder.metadata == {"uri": open_storage(stage.storage).join(
        "checkpoints/mae-adopt-1/encoder.pt"), "method": "mae", "steps": float(STEPS),
        "resumed": "true"}  # fmt: skip
    assert metrics.metadata == {"steps": STEPS, "loss": 0.5, "lr": 2e-4}


def test_a_job_an_earlier_attempt_left_failed_is_replaced(stage, operator):
    store_a_finished_pretraining(stage, "mae-again-1")
    operator.add(job_of("mae-again-1"), condition("Failed"))
    operator.outcome = "succeed"

    encoder, _ = launch(stage, operator, "again-1")

    assert [(m, status) for m, _, status in operator.requests if m != "GET"] == [
        ("POST", 409), ("DELETE", 200), ("POST", 201)]  # fmt: skip
    assert encoder.metadata["resumed"] == "true"


def test_a_timeout_deletes_the_job_and_raises(stage, operator):
    operator.outcome = "hang"
    with pytest.raises(TimeoutError, match=r"team-a/mae-slow-1 not finished after 1 s .*Running"):
        launch(stage, operator, "slow-1", timeout_s=1.0)
    assert operator.calls("DELETE") == ["pytorchjobs/team-a/mae-slow-1"] and not operator.jobs


def test_a_refused_create_names_the_job_and_the_http_status(stage, operator):
    operator.refuse = 403  # e.g. the Role lacks "create" on pytorchjobs
    with pytest.raises(launcher.PyTorchJobError,
                       match=r"creating PyTorchJob team-a/mae-rbac-1: HTTP 403 .*Invalid"):  # fmt: skip
        launch(stage, operator, "rbac-1")


# -- names, namespace, options, client config ---------------------------------------------


def test_job_names_are_dns_labels_unique_per_run() -> None:
    long_run = "3f2a7c1e-9b4d-4e8f-a1c2-0d9e8f7a6b5c"
    names = [launcher.job_name(f"dinov2-{long_run}", long_run),
             launcher.job_name(f"dinov2-{long_run[:-1]}x", long_run[:-1] + "x"),
             launcher.job_name("mae-big_line", "run-7"), launcher.job_name("mae-r1", "r1")]  # fmt: skip
    assert names[2:] == ["mae-big-line-run-7", "mae-r1"]
    assert len(set(names)) == 4
    for name in names:
        assert len(name) <= launcher.NAME_LIMIT and re.fullmatch(
            r"[a-z]([-a-z0-9]*[a-z0-9])?", name
        )


def test_namespace_is_the_parameter_else_the_pods_own(tmp_path, monkeypatch) -> None:
    sa_file = tmp_path / "namespace"
    sa_file.write_text("kubeflow-user-example-com\n")
    monkeypatch.setattr(launcher, "SA_NAMESPACE_FILE", sa_file)
    assert launcher.current_namespace() == "kubeflow-user-example-com"
    assert launcher.current_namespace("team-a") == "team-a"


def test_pipeline_options_reach_the_launcher_intact() -> None:
    opts = PipelineOptions(train_image="registry.example/train@sha256:" + "b" * 64,
                           gpu_node_selector={"pool": "h100"}, gpu_tolerations=[],
                           train=Resources("16", "128Gi"), shm_size="64Gi")  # fmt: skip
    assert PipelineOptions.from_json(opts.to_json()) == opts
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['trian_image'\]"):
        PipelineOptions.from_json('{"trian_image": "x"}')


def test_outside_a_pod_the_client_uses_the_kubeconfig(operator, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("KUBECONFIG", kubeconfig(tmp_path / "config", operator.host,
                                                "from-kubeconfig"))  # fmt: skip
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setattr(launcher, "SA_NAMESPACE_FILE", tmp_path / "absent")
    assert launcher.current_namespace() == "from-kubeconfig"
    operator.add(job_of("j", "from-kubeconfig"), condition("Succeeded"))
    assert launcher.wait(launcher.connect(), "from-kubeconfig", "j", 5)["metadata"]["name"] == "j"
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    with pytest.raises(launcher.PyTorchJobError, match="no Kubernetes API"):
        launcher.connect()


# -- the DAG under kfp.local: nodes=2 takes the PyTorchJob branch -----------------------------


@pytest.mark.slow  # ~50 s: five component processes under kfp.local (run with -m slow)
def test_dag_with_two_nodes_pretrains_through_the_pytorchjob_and_finetunes_its_encoder(
    operator, tmp_path, monkeypatch
) -> None:
    from pipelines.local import run_local

    # the launcher's subprocess reads it
    monkeypatch.setenv("KUBECONFIG", kubeconfig(tmp_path / "kubeconfig", operator.host, "team-a"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    overrides = [
        f"run_dir={tmp_path / 'run'}", "synthetic.scenes={tr: 4, va: 1, ts: 1}",
        "synthetic.size=64", "data.scene_size=64", "pretrain.batch_size=4",
        f"pretrain.max_steps={STEPS}", "pretrain.knn_tiles=0", "pretrain.loader_threads=1",
        "pretrain.device=cpu", "mae.model=mae_vit_tiny_patch8_64", "finetune.max_steps=1",
        "finetune.batch_size=4", "finetune.eval_scenes=1", "finetune.loader_threads=1",
    ]  # fmt: skip
    run = run_local(REPO / "configs" / "tiny.yaml", overrides,
                    ["ingest", "pretrain-mae", "finetune-heads"],
                    {"nodes": 2, "gpus": 8, "run_dinov2": False, "run_ssvit": False,
                     "heads": ["linear"], "control_encoder": "",
                     "gpu_node_selector": {"pool": "a100"}, "gpu_tolerations": []})  # fmt: skip
    (job,) = operator.posted
    assert job["metadata"]["namespace"] == "team-a" and job["spec"]["nprocPerNode"] == "8"
    for replica in job["spec"]["pytorchReplicaSpecs"].values():  # the run's GPU placement
        pod = replica["template"]["spec"]
        assert (pod["nodeSelector"], pod["tolerations"]) == ({"pool": "a100"}, [])
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
    tasks = {path.rsplit("/", 1)[-1] for path in run.tasks}
    assert "launch-pytorchjob" in tasks and "pretrain-mae" not in tasks  # the Else branch idle
    encoder = run.output("launch-pytorchjob", "encoder")["metadata"]
    assert encoder["uri"].endswith(f"/checkpoints/mae-{run.run_id}/encoder.pt")
    (head,) = [t for p, t in run.tasks.items() if re.search(r"/finetune-heads(-\d+)?$", p)]
    assert head["artifacts"]["results"]["metadata"]["encoder"] == encoder["uri"]
