"""The KFP backend the compiled pipeline needs (floor 2.15), the server check in submit/upload,
and GPU placement as run parameters.

Minimum versions are read from kubeflow/pipelines at its release tags (``pipelines/backend.py``
names the file of each): the ``optional`` field of SecretAsEnv / ConfigMapAsEnv first appears in
``kubernetes_platform/proto/kubernetes_executor_config.proto`` at 2.15.0, and the 2.14.0 Argo
compiler (``backend/src/v2/compiler/argocompiler/container.go``) unmarshals each task's Kubernetes
config with a strict ``protojson.Unmarshal``; ``node_selector_json`` / ``toleration_json`` appear
at 2.5.0; the driver resolves ``TaskFinalStatus`` from 2.14.0 (``backend/src/v2/driver/resolve.go``).
The API server reports its version as ``tag_name`` at ``/apis/v2beta1/healthz``
(``backend/src/apiserver/main.go``, 2.15.0), "unknown" when it was built without one.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from components.options import PipelineOptions
from pipelines.backend import (
    MIN_BACKEND,
    PLATFORM_CONSTRUCTS,
    SPEC_CONSTRUCTS,
    constructs_in,
    minimum_backend,
    parse_version,
    version_text,
)
from pipelines.compile import compile_pipeline, main
from pipelines.dag import stage_names
from test_pipeline import KfpStub

REPO = Path(__file__).resolve().parents[1]
TRAIN_EXECUTORS = ("pretrain", "finetune-heads", "baseline")


def _docs(path: Path) -> list[dict]:
    return list(yaml.safe_load_all(path.read_text()))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, list[dict]]:
    """The DAG (default options and with a data PVC) and every one-stage rerun pipeline."""
    out = tmp_path_factory.mktemp("compiled")
    docs = {"dag": _docs(compile_pipeline(out / "dag.yaml")),
            "dag-pvc": _docs(compile_pipeline(out / "pvc.yaml", PipelineOptions(data_pvc="whu")))}  # fmt: skip
    for stage in stage_names():
        docs[stage] = _docs(compile_pipeline(out / f"{stage}.yaml", stage=stage))
    return docs


def test_every_construct_of_the_compiled_pipelines_is_within_the_floor(compiled) -> None:
    """Each construct used (listed with its minimum backend) is known and none is newer than
    MIN_BACKEND; the floor itself is what the newest construct needs."""
    used: set[str] = set()
    for name, docs in compiled.items():
        constructs = constructs_in(docs)
        assert minimum_backend(constructs) <= MIN_BACKEND, name  # KeyError names unknown ones
        used |= constructs
    table = {**PLATFORM_CONSTRUCTS, **SPEC_CONSTRUCTS}
    listing = {c: version_text(table[c][0]) for c in sorted(used)}
    assert listing["secretAsEnv.optional"] == listing["configMapAsEnv.optional"] == "2.15.0"
    assert listing["taskFinalStatus"] == "2.14.0"
    assert listing["nodeSelector.nodeSelectorJson"] == "2.5.0"
    assert listing["pvcMount"] == "2.0.0"  # --data-pvc
    assert listing["pvcMount.pvcNameParameter"] == "2.5.0"  # the claim is a run parameter
    assert minimum_backend(used) == MIN_BACKEND == (2, 15, 0)


def test_an_unlisted_construct_fails_the_check() -> None:
    docs = [{}, {"platforms": {"kubernetes": {"deploymentSpec": {"executors": {
        "exec-x": {"secretAsEnv": [{"optional": True}], "nodeAffinity": [{}]}}}}}}]  # fmt: skip
    assert constructs_in(docs) == {"secretAsEnv", "secretAsEnv.optional", "nodeAffinity"}
    with pytest.raises(KeyError, match="nodeAffinity"):
        minimum_backend(constructs_in(docs))


def test_docs_state_the_floor_first_and_list_every_construct() -> None:
    floor = version_text(MIN_BACKEND)
    deploy = (REPO / "docs" / "deploy.md").read_text()
    readme = (REPO / "README.md").read_text()
    pipeline = (REPO / "docs" / "pipeline.md").read_text()
    for text in (deploy, readme, pipeline):
        first_heading = text.index("\n## ")
        assert f"Kubeflow Pipelines backend >= {floor}" in text[:first_heading]
    for construct, (version, _evidence) in {**PLATFORM_CONSTRUCTS, **SPEC_CONSTRUCTS}.items():
        row = f"| `{construct}` | {version_text(version)} |"
        assert row in deploy, f"docs/deploy.md lacks the compatibility row {row!r}"


@pytest.mark.parametrize(("text", "version"), [("2.15.0", (2, 15, 0)), ("v2.16.1", (2, 16, 1)),
                         ("2.17.0-rc.1", (2, 17, 0)), ("unknown", None), ("", None)])  # fmt: skip
def test_server_versions_parse(text: str, version) -> None:
    assert parse_version(text) == version


# -- the check in submit / upload against a loopback KFP API ----------------------------------


class VersionedKfp(KfpStub):
    tag_name = "unknown"

    def do_GET(self) -> None:
        if self.path.endswith("/healthz"):
            self._record()
            return self._reply({"commit_sha": "abc", "tag_name": self.tag_name,
                                "multi_user": False})  # fmt: skip
        super().do_GET()


@pytest.fixture
def versioned_host():
    KfpStub.requests, KfpStub.pipelines, KfpStub.runs = [], {}, {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), VersionedKfp)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True,
                          text=True, cwd=REPO, stdin=subprocess.DEVNULL)  # fmt: skip


def _posted(path_end: str) -> list[dict]:
    return [r for r in KfpStub.requests if r["method"] == "POST" and r["path"].endswith(path_end)]


@pytest.mark.parametrize("command", ["submit", "upload"])
def test_an_older_server_is_refused_before_anything_is_sent(versioned_host, command) -> None:
    VersionedKfp.tag_name = "2.14.0"
    extra = ["--version", "sha-1"] if command == "upload" else []
    proc = _cli(command, "--host", versioned_host, *extra)
    assert proc.returncode == 2
    assert "is version 2.14.0; this pipeline needs KFP backend >= 2.15.0" in proc.stderr
    assert not _posted("/runs") and not _posted("/upload")
    proc = _cli(command, "--host", versioned_host, "--skip-version-check", *extra)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("tag", ["2.15.0", "unknown"])
def test_a_new_enough_or_unversioned_server_takes_the_run(versioned_host, tag) -> None:
    VersionedKfp.tag_name = tag
    proc = _cli("submit", "--host", versioned_host, "--param", "source=generated")
    assert proc.returncode == 0, proc.stderr
    assert len(_posted("/runs")) == 1
    if tag == "unknown":
        assert "reports no version" in proc.stderr


# -- GPU placement: run parameters in kfp-kubernetes' JSON forms --------------------------------


def _train_executors(docs: list[dict]) -> dict[str, dict]:
    executors = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    return {k: v for k, v in executors.items() if any(t in k for t in TRAIN_EXECUTORS)}


def test_gpu_node_selector_and_tolerations_are_run_parameters(compiled) -> None:
    for name in ("dag", "pretrain-mae", "finetune-heads", "baseline-deeplabv3plus"):
        docs = compiled[name]
        params = docs[0]["root"]["inputDefinitions"]["parameters"]
        assert params["gpu_node_selector"]["defaultValue"] == {"nvidia.com/gpu.present": "true"}
        assert params["gpu_tolerations"]["defaultValue"] == [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]  # fmt: skip
        train = _train_executors(docs)
        assert train, name
        for executor, config in train.items():
            assert config["nodeSelector"] == {"nodeSelectorJson": {
                "componentInputParameter": "pipelinechannel--gpu_node_selector"}}, executor  # fmt: skip
            assert config["tolerations"] == [{"tolerationJson": {
                "componentInputParameter": "pipelinechannel--gpu_tolerations"}}], executor  # fmt: skip
    launches = [t for c in compiled["dag"][0]["components"].values()
                for n, t in (c.get("dag") or {}).get("tasks", {}).items() if n.startswith("launch")]  # fmt: skip
    assert len(launches) == 3
    for task in launches:  # the multi-node job's pods get the run's placement too
        params = task["inputs"]["parameters"]
        assert params["gpu_node_selector"] == {
            "componentInputParameter": "pipelinechannel--gpu_node_selector"}  # fmt: skip


def test_compile_flags_set_the_placement_defaults(tmp_path: Path) -> None:
    out = tmp_path / "p.yaml"
    main(["-o", str(out), "--gpu-node-selector", "pool=a100", "--no-gpu-toleration"])
    params = _docs(out)[0]["root"]["inputDefinitions"]["parameters"]
    assert params["gpu_node_selector"]["defaultValue"] == {"pool": "a100"}
    assert params["gpu_tolerations"]["defaultValue"] == []


def test_the_run_placement_reaches_the_pytorchjob_options() -> None:
    opts = PipelineOptions.from_json(PipelineOptions().to_json())
    placed = opts.placed({"pool": "a100"}, [])
    assert (placed.gpu_node_selector, placed.gpu_tolerations) == ({"pool": "a100"}, [])
    assert opts.placed(None, None) == opts
    assert json.loads(placed.to_json())["gpu_node_selector"] == {"pool": "a100"}


def test_the_data_claim_is_a_run_parameter_when_compiled_with_one(compiled) -> None:
    docs = compiled["dag-pvc"]
    params = docs[0]["root"]["inputDefinitions"]["parameters"]
    assert params["data_pvc"]["defaultValue"] == "whu"
    executors = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    (mount,) = executors["exec-ingest"]["pvcMount"]
    assert mount["pvcNameParameter"] == {"componentInputParameter": "pipelinechannel--data_pvc"}
    assert mount["mountPath"] == "/data"
    plain = compiled["dag"][1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert "pvcMount" not in plain["exec-ingest"]  # no claim compiled in: nothing mounted
