"""The stage images, built here and run as the cluster runs them (``make test-images``).

Builds images/cpu.Dockerfile (and images/train.Dockerfile) with buildah on a Debian base made
with mmdebstrap (``scripts/images.sh``, LOCAL=1: no container registry is reachable here), then
runs the ingest and report components' container commands, exactly as compiled into the
pipeline YAML, inside the CPU image as uid 10001 against the loopback S3 server and MLflow: the
executor input is what the KFP v2 launcher would pass (``{{$}}``), the cache emptyDir a volume.
Afterwards the container's writable layer must hold nothing outside the paths a KFP pod may
write (the launcher's /gcs, /minio, /s3 and /tmp): the image runs on a read-only root.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml

from components.images import image_ref
from components.options import PipelineOptions
from hsissl.storage import open_storage
from pipelines.compile import compile_pipeline

REPO = Path(__file__).resolve().parents[1]
MISSING_TOOLS = [t for t in ("buildah", "mmdebstrap") if shutil.which(t) is None]
pytestmark = [
    pytest.mark.images,
    pytest.mark.skipif(bool(MISSING_TOOLS), reason=f"{' and '.join(MISSING_TOOLS)} not installed "
                       "(apt-get install buildah mmdebstrap): the image tests build with them"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: buildah's chroot isolation without "
                       "a rootless setup, and a cache volume owned by uid 10001"),
]  # fmt: skip
UID = "10001"
# Where a stage pod may write: the KFP launcher's artifact staging folders (owned by 10001 in
# the image), /tmp (run_dir of the cluster preset, executor output) and the mounted volumes.
WRITABLE = ("/gcs", "/minio", "/s3", "/tmp")
# Files buildah itself puts into a container it runs (Kubernetes mounts its own).
RUNTIME_FILES = {"/etc/hosts", "/etc/resolv.conf", "/etc/hostname", "/run", "/run/.containerenv"}
TAG = "images-test"


def build(kind: str, git_sha: str | None = None) -> tuple[str, float]:
    """Build images/<kind>.Dockerfile (cached layers reused); its reference and seconds."""
    start = time.monotonic()
    env = {**os.environ, "LOCAL": "1", "IMAGE_TAG": TAG, "BUILDER": "buildah"}
    if git_sha:
        env["GIT_SHA"] = git_sha
    proc = subprocess.run(["bash", "scripts/images.sh", "build", kind], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=3600)  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return image_ref(kind, tag=TAG), time.monotonic() - start


@pytest.fixture(scope="module")
def cpu_image() -> str:
    ref, seconds = build("cpu")
    print(f"\ncpu image {ref} ready in {seconds:.0f} s")
    return ref


class Container:
    """A buildah working container of ``image``; ``run`` executes a command in it."""

    def __init__(self, image: str, volumes: dict[str, Path]):
        self.name = f"hsissl-test-{uuid.uuid4().hex[:8]}"
        self.volumes = volumes
        subprocess.run(["buildah", "from", "--name", self.name, image], check=True,
                       capture_output=True)  # fmt: skip

    def run(self, argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
        flags = ["--isolation", "chroot", "--network", "host", "--user", f"{UID}:{UID}"]
        flags += [f"--volume={host}:{inside}" for inside, host in self.volumes.items()]
        flags += [f"--env={k}={v}" for k, v in env.items()]
        return subprocess.run(["buildah", "run", *flags, self.name, "--", *argv],
                              capture_output=True, text=True, timeout=1800)  # fmt: skip

    def written(self) -> list[str]:
        """Paths in the container's writable layer (overlay upper dir)."""
        merged = subprocess.run(["buildah", "mount", self.name], check=True, capture_output=True,
                                text=True).stdout.strip()  # fmt: skip
        upper = Path(merged).parent / "diff"
        assert upper.is_dir(), f"expected an overlay upper dir at {upper}"
        return sorted("/" + str(p.relative_to(upper)) for p in upper.rglob("*"))

    def read(self, path: str) -> bytes:
        merged = subprocess.run(["buildah", "mount", self.name], check=True, capture_output=True,
                                text=True).stdout.strip()  # fmt: skip
        return (Path(merged) / path.lstrip("/")).read_bytes()

    def remove(self) -> None:
        subprocess.run(["buildah", "rm", self.name], capture_output=True)


def outside_writable(paths: list[str], volumes: dict[str, Path]) -> list[str]:
    allowed = (*WRITABLE, *volumes)
    parents = {"/" + "/".join(a.strip("/").split("/")[:i]) for a in allowed
               for i in range(1, a.count("/"))}  # fmt: skip
    return [p for p in paths if p not in RUNTIME_FILES | parents
            and not any(p == a or p.startswith(a + "/") for a in allowed)]  # fmt: skip


def executor_command(compiled: dict, executor: str, executor_input: dict) -> list[str]:
    """The container command of ``executor`` with KFP's ``{{$}}`` placeholder filled in."""
    container = compiled["deploymentSpec"]["executors"][executor]["container"]
    args = [json.dumps(executor_input) if a == "{{$}}" else a for a in container["args"]]
    return [*container["command"], *args]


def output_artifact(name: str, schema: str, uri: str) -> dict:
    return {"artifacts": [{"name": name, "type": {"schemaTitle": schema, "schemaVersion": "0.0.1"},
                           "uri": uri, "metadata": {}}]}  # fmt: skip


@pytest.fixture(scope="module")
def compiled(cpu_image: str, tmp_path_factory) -> dict:
    opts = PipelineOptions(cpu_image=cpu_image)
    path = compile_pipeline(tmp_path_factory.mktemp("compiled") / "hsissl.yaml", opts)
    spec, platform = yaml.safe_load_all(path.read_text())
    return {**spec, "k8s": platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]}


def test_ingest_and_report_run_in_the_cpu_image_as_uid_10001(
    cpu_image, compiled, s3_server, mlflow_server, tmp_path
):
    for executor in ("exec-ingest", "exec-report"):
        assert compiled["deploymentSpec"]["executors"][executor]["container"]["image"] == cpu_image
    # the cache emptyDir of the compiled pod, as a volume owned by the pod's user
    (cache,) = [m for m in compiled["k8s"]["exec-ingest"]["emptyDirMounts"]
                if m["volumeName"] == "cache"]  # fmt: skip
    volumes = {cache["mountPath"]: tmp_path / "cache"}
    volumes[cache["mountPath"]].mkdir()
    os.chown(volumes[cache["mountPath"]], int(UID), int(UID))
    container_env = {e["name"]: e["value"]
                     for e in compiled["deploymentSpec"]["executors"]["exec-ingest"]["container"]
                     .get("env", [])}  # fmt: skip
    env = {**s3_server.env(), **container_env, "MLFLOW_TRACKING_URI": mlflow_server,
           "KFP_RUN_ID": "images-test"}  # fmt: skip
    bucket = f"hsissl-img-{uuid.uuid4().hex[:10]}"
    storage = f"s3://{bucket}/store"
    overrides = ["run_dir=/tmp/hsissl", "synthetic.scenes={tr: 4, va: 1, ts: 1}",
                 "synthetic.size=64", "data.scene_size=64", "report.scenes=1",
                 "tracking.experiment=images-test"]  # fmt: skip
    params = {"preset": "/app/configs/tiny.yaml", "overrides": overrides,
              "storage_uri": storage, "tracking_uri": mlflow_server}  # fmt: skip
    box = Container(cpu_image, volumes)
    try:
        whoami = box.run(["python3", "-c", "import os; print(os.getuid(), os.getgid())"], env)
        assert whoami.stdout.split() == [UID, UID], whoami.stderr

        ingest_input = {
            "inputs": {"parameterValues": {**params, "source": ""}},
            "outputs": {"artifacts": {"dataset": output_artifact(
                "dataset", "system.Dataset", f"s3://{bucket}/kfp/ingest/dataset")},
                "outputFile": "/tmp/kfp_outputs/ingest.json"},
        }  # fmt: skip
        proc = box.run(executor_command(compiled, "exec-ingest", ingest_input), env)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
        output = json.loads(box.read("/tmp/kfp_outputs/ingest.json"))
        dataset_uri = output["artifacts"]["dataset"]["artifacts"][0]["metadata"]["uri"]
        assert dataset_uri == f"{storage}/datasets/whu-ohs"
        # The dataset is a commit (hsissl.storage.commit): read it through its pointer.
        with pytest.MonkeyPatch.context() as patch:
            for name, value in s3_server.env().items():
                patch.setenv(name, value)
            store = open_storage(storage)
            manifest = json.loads(store.get_bytes("datasets/whu-ohs/manifest.json"))
            shards = store.list("datasets/whu-ohs/tr")
        assert manifest["splits"]["tr"]["tiles"] > 0
        assert any(s.endswith(".npy") for s in shards)

        report_input = {
            "inputs": {"parameterValues": {**params, "kfp_run_id": "images-test", "status": {
                "state": "SUCCEEDED", "pipelineJobResourceName": "images-test",
                "pipelineTaskName": "report", "error": {}}}},
            "outputs": {"artifacts": {
                "html": output_artifact("html", "system.HTML", f"s3://{bucket}/kfp/report/html"),
                "markdown": output_artifact("markdown", "system.Markdown",
                                            f"s3://{bucket}/kfp/report/markdown")},
                "outputFile": "/tmp/kfp_outputs/report.json"},
        }  # fmt: skip
        proc = box.run(executor_command(compiled, "exec-report", report_input), env)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
        html = box.read(f"/s3/{bucket}/kfp/report/html").decode()
        assert html.lstrip().lower().startswith(("<!doctype html", "<html")) and "</html>" in html

        written = box.written()
        outside = outside_writable(written, volumes)
        assert outside == [], f"written outside {WRITABLE} and the volumes: {outside}"
        assert any(p.startswith("/s3/") for p in written)  # the check sees what was written
    finally:
        box.remove()


def test_the_image_runs_as_the_non_root_user_with_only_declared_folders_writable(cpu_image):
    assert image_config(cpu_image)["User"] == f"{UID}:{UID}"
    box = Container(cpu_image, {})
    try:
        probe = ("import os; print(' '.join(p for p in ('/', '/app', '/opt/venv', '/etc', '/usr', "
                 "'/gcs', '/minio', '/s3', '/tmp') if os.access(p, os.W_OK)))")  # fmt: skip
        proc = box.run(["python3", "-c", probe], {})
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == ["/app", "/gcs", "/minio", "/s3", "/tmp"]
        assert box.run(["hsissl", "--help"], {}).returncode == 0
        # the build machine's pip configuration was mounted for the RUN steps only
        leaked = box.run(["find", "/run/host-pip", "-type", "f", "-size", "+0"], {})
        assert leaked.returncode in (0, 1) and leaked.stdout == "", leaked.stdout
    finally:
        box.remove()


def image_config(ref: str) -> dict:
    out = subprocess.run(["buildah", "inspect", "--type", "image", ref], check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    return json.loads(out)["OCIv1"]["config"]


def test_a_rebuild_for_another_commit_carries_that_commits_revision(cpu_image):
    """The dependency layers come from the cache, the revision must not (a cached ENV/LABEL
    of the previous build would name the wrong commit in MLflow's git_sha tag)."""
    for sha in ("1" * 40, "2" * 40):
        ref, _ = build("cpu", git_sha=sha)
        config = image_config(ref)
        assert f"HSISSL_GIT_SHA={sha}" in config["Env"]
        assert config["Labels"]["org.opencontainers.image.revision"] == sha
    build("cpu")  # back to this checkout's revision for the other tests


def test_the_train_image_builds_and_imports_the_training_stack():
    ref, seconds = build("train")
    print(f"\ntrain image {ref} ready in {seconds:.0f} s")
    box = Container(ref, {})
    try:
        probe = ("import torch, timm, segmentation_models_pytorch, hsissl.stages.pretrain, os; "
                 "print(torch.__version__, os.getuid())")  # fmt: skip
        proc = box.run(["python3", "-c", probe], {})
        assert proc.returncode == 0, proc.stderr[-3000:]
        version, uid = proc.stdout.split()
        assert version.startswith("2.14.1") and uid == UID
    finally:
        box.remove()
