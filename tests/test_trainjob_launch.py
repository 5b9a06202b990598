"""Multi-node pretraining on the current Kubeflow Trainer (v2 ``TrainJob``) and the choice
between it and the Training Operator's ``PyTorchJob``, against the loopback Kubernetes API of
``tests/fake_kube.py``.

The TrainJob behaviour encoded here is kubeflow/trainer v2.3.0's (trainjob_types.go: success
is the ``Complete`` condition, ``runtimePatches`` since v2.2.0; plugins/torch/torch.go: the
``PET_*`` rendezvous variables are the Trainer's). The manifest was also checked once against
the v2.3.0 and v2.2.0 CRD schemas (manifests/base/crds/trainer.kubeflow.org_trainjobs.yaml,
unknown fields as errors): valid; v2.1.0's rejects ``runtimePatches``, hence the 2.2 floor.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from dataclasses import replace

import jsonschema
import pytest

import test_pytorchjob_launch as pj
from components.jobs import launcher, trainjob
from components.jobs.multinode import NoTrainerError, TrainingJobError
from components.options import PipelineOptions
from fake_kube import condition, serve
from hsissl.pretrain import checkpoint
from hsissl.storage import open_storage

stage, clean_env = pj.stage, pj.clean_env  # the PyTorchJob tests' fixtures: dataset, env
launch, job_of, store_a_finished_pretraining = pj.launch, pj.job_of, pj.store_a_finished_pretraining


@pytest.fixture
def cluster(request):
    """The loopback API serving the job APIs named by ``@pytest.mark.parametrize``'s
    ``cluster`` (indirect), default Trainer v2 only."""
    fake, server = serve(getattr(request, "param", ("trainjob",)))
    yield fake
    server.shutdown()
    server.server_close()


def test_launcher_creates_a_valid_trainjob_waits_and_emits_the_encoder(stage, cluster):
    encoder, metrics = launch(stage, cluster, "tj-1")

    (job,) = cluster.posted
    trainjob.validate(job)  # the TrainJob schema, reserved env, the node pod against Kubernetes
    assert cluster.queries == [{"fieldValidation": ["Strict"]}]  # an older CRD fails loudly
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and job["kind"] == "TrainJob"
    assert job["metadata"]["name"] == "mae-tj-1" and job["metadata"]["namespace"] == "team-a"
    spec = job["spec"]
    assert spec["runtimeRef"] == {"name": "torch-distributed", "apiGroup": "trainer.kubeflow.org",
                                  "kind": "ClusterTrainingRuntime"}  # fmt: skip
    trainer = spec["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 4)
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "4"
    assert trainer["image"] == PipelineOptions().train_image
    assert trainer["command"][:6] == ["torchrun", "-m", "hsissl.cli", "pretrain-mae", "--config",
                                      stage.preset]  # fmt: skip
    assert 'pretrain.name="mae-tj-1"' in trainer["command"]
    assert {"name": "KFP_RUN_ID", "value": "tj-1"} in trainer["env"]
    assert not {e["name"] for e in trainer["env"]} & set(trainjob.RESERVED_ENV)
    (patch,) = spec["runtimePatches"]
    assert patch["manager"] == "hsissl.io/launcher"
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = node["template"]["spec"]["template"]
    assert node["name"] == "node" and pod["metadata"]["labels"] == {"hsissl.io/pipeline": "true"}
    assert pod["spec"]["serviceAccountName"] == "hsissl-pipeline"
    assert {v["name"] for v in pod["spec"]["volumes"]} == {
        "dshm",
        "config",
        "cache",
    }  # + the shard cache (#14)
    assert pod["spec"]["containers"] == [{"name": "node", "volumeMounts": [
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "config", "mountPath": "/etc/hsissl", "readOnly": True},
        {"name": "cache", "mountPath": "/var/cache/hsissl"}]}]  # fmt: skip
    assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["spec"]["tolerations"] == PipelineOptions().gpu_tolerations

    store = open_storage(stage.storage)
    assert encoder.metadata == {"uri": store.join("checkpoints/mae-tj-1/encoder.pt"),
                                "method": "mae", "steps": 4.0, "resumed": "false"}  # fmt: skip
    assert metrics.metadata["steps"] == 4
    _, _, record = checkpoint.load_model(encoder.metadata["uri"])
    assert record["step"] == 4 and record["method"] == "mae"


@pytest.mark.parametrize("cluster", [("trainjob", "pytorchjob")], indirect=True)
def test_with_both_installed_auto_takes_trainjob_and_the_option_can_choose(stage, cluster):
    cluster.outcome = "succeed"
    for run_id in ("both-1", "both-2"):
        store_a_finished_pretraining(stage, f"mae-{run_id}")

    launch(stage, cluster, "both-1")
    launch(stage, cluster, "both-2", opts=PipelineOptions(multi_node_api="pytorchjob"))

    assert [job["kind"] for job in cluster.posted] == ["TrainJob", "PyTorchJob"]


@pytest.mark.parametrize("cluster", [()], indirect=True)
def test_a_cluster_with_neither_api_fails_at_once_naming_what_to_install(stage, cluster):
    with pytest.raises(NoTrainerError) as failure:
        launch(stage, cluster, "none-1")
    message = str(failure.value)
    assert f"at {cluster.host} serves neither TrainJob (trainer.kubeflow.org/v1alpha1) nor " \
           "PyTorchJob (kubeflow.org/v1)" in message  # fmt: skip
    assert "install Kubeflow Trainer v2 >= 2.2" in message and "torch-distributed" in message
    assert "or the Kubeflow Training Operator v1" in message and "nodes=1" in message
    assert cluster.calls("POST") == []


@pytest.mark.parametrize("cluster", [("pytorchjob",)], indirect=True)
def test_a_chosen_api_the_cluster_lacks_is_named_with_the_one_it_has(stage, cluster):
    with pytest.raises(NoTrainerError, match=r"compiled with --multi-node-api trainjob, but .* "
                       r"does not serve TrainJob .*it serves PyTorchJob: compile with "
                       r"--multi-node-api pytorchjob or auto.*install Kubeflow Trainer v2"):  # fmt: skip
        launch(stage, cluster, "pick-1", opts=PipelineOptions(multi_node_api="trainjob"))
    assert cluster.calls("POST") == []


def test_a_failed_trainjob_names_its_reason_and_where_the_logs_are(stage, cluster):
    cluster.outcome = "fail"
    cluster.failure = ("BackoffLimitExceeded", "jobset node failed: backoff limit reached")
    with pytest.raises(TrainingJobError, match=r"TrainJob team-a/mae-tfail-1: "
                       r"BackoffLimitExceeded: jobset node failed.*kubectl -n team-a describe "
                       r"trainjob mae-tfail-1; logs: kubectl -n team-a logs -l "
                       r"jobset.sigs.k8s.io/jobset-name=mae-tfail-1"):  # fmt: skip
        launch(stage, cluster, "tfail-1")
    assert cluster.calls("DELETE") == []  # kept for kubectl describe / logs


def test_a_retried_task_adopts_its_running_trainjob_until_complete(stage, cluster):
    store_a_finished_pretraining(stage, "mae-tadopt-1")
    key = cluster.add(job_of("mae-tadopt-1", kind="TrainJob"))  # running: no condition yet
    threading.Timer(0.5, cluster.set, (key, condition("Complete"))).start()

    encoder, _ = launch(stage, cluster, "tadopt-1")

    assert [status for m, _, status in cluster.requests if m == "POST"] == [409]
    assert encoder.metadata["resumed"] == "true"


def test_an_older_trainer_without_runtime_patches_is_named(stage, cluster):
    # What kube-apiserver answers a POST with fieldValidation=Strict carrying a field the CRD's
    # structural schema lacks (Kubernetes >= 1.27): 400 with the field named.
    cluster.refuse = 400
    cluster.refusal = ('TrainJob in version "v1alpha1" cannot be handled as a TrainJob: strict '
                       'decoding error: unknown field "spec.runtimePatches"')  # fmt: skip
    with pytest.raises(TrainingJobError, match=r"creating TrainJob team-a/mae-old-1: HTTP 400 "
                       r".*unknown field .*spec.runtimePatches.*predates runtimePatches.*"
                       r"Kubeflow Trainer v2 >= 2.2"):  # fmt: skip
        launch(stage, cluster, "old-1")


# -- the manifest offline -------------------------------------------------------------------


def test_trainjob_manifests_are_checked_offline() -> None:
    job = trainjob.build_trainjob("pretrain-dinov2", ["dinov2.lr=2.0e-4"], nodes=4,
                                  gpus_per_node=8, name="dino-4x8", runtime="torch-cuda-13")  # fmt: skip
    trainjob.validate(job)
    assert job["spec"]["runtimeRef"]["name"] == "torch-cuda-13"

    bad_manager = json.loads(json.dumps(job))
    bad_manager["spec"]["runtimePatches"][0]["manager"] = "hsissl"  # not domain-prefixed
    with pytest.raises(jsonschema.ValidationError, match="does not match"):
        trainjob.validate(bad_manager)
    env_on_node = json.loads(json.dumps(job))  # the Trainer's webhook refuses env in the patch
    node = env_on_node["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]
    node["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]["env"] = []
    with pytest.raises(jsonschema.ValidationError):
        trainjob.validate(env_on_node)
    with pytest.raises(ValueError, match=r"\['PET_NNODES'\]: reserved"):
        trainjob.validate(trainjob.build_trainjob("pretrain-mae", [], nodes=2, gpus_per_node=1,
                                                  name="x", extra_env={"PET_NNODES": "2"}))  # fmt: skip
    with pytest.raises(ValueError, match="unknown config key .mae.nope."):
        trainjob.build_trainjob("pretrain-mae", ["mae.nope=1"], nodes=2, gpus_per_node=1,
                                name="x")  # fmt: skip


def test_cli_prints_a_checked_trainjob(tmp_path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "trainjob", "--stage", "pretrain-mae",
         "--nodes", "3", "--gpus-per-node", "2", "--name", "mae-3x2", "--trainjob-runtime",
         "torch-distributed-cuda", "--run-id", "big-1", "mae.mask_ratio=0.6"],
        capture_output=True, text=True, cwd=tmp_path, stdin=subprocess.DEVNULL, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    import yaml

    job = yaml.safe_load(out.stdout)
    trainjob.validate(job)
    assert job["spec"]["runtimeRef"]["name"] == "torch-distributed-cuda"
    assert job["spec"]["trainer"]["numNodes"] == 3
    assert "mae.mask_ratio=0.6" in job["spec"]["trainer"]["command"]


def test_options_carry_the_api_choice_to_the_launcher() -> None:
    opts = replace(PipelineOptions(), multi_node_api="trainjob", trainjob_runtime="rt")
    assert PipelineOptions.from_json(opts.to_json()) == opts
    assert PipelineOptions.from_json("{}").multi_node_api == "auto"  # older compiled pipelines
    with pytest.raises(ValueError, match=r"expected one of \['auto', 'trainjob', 'pytorchjob'\]"):
        from components.jobs.multinode import detect

        detect(None, "tfjob")
    assert launcher.PyTorchJobError is TrainingJobError
    assert (pj.REPO / "components" / "jobs" / "trainjob.schema.json").is_file()
