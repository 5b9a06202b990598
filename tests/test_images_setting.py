"""The one registry/tag setting (pipelines/images.env): what is compiled references exactly what
CI pushes; CI's scripts (.ci/image-tags, .ci/upload-pipeline) and workflow; image pull secrets
and the shard cache emptyDir in compiled pipelines and PyTorchJob pods."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.images import image_ref, read_setting
from components.jobs.pytorchjob import build_pytorchjob
from components.options import PipelineOptions
from pipelines.compile import GOLDEN

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / ".github" / "workflows" / "ci.yml"
SHA = "c0ffee" + "0" * 34


def shell_setting() -> dict[str, str]:
    """The setting as a shell sees it (how the Makefile and CI read the same file)."""
    out = subprocess.run(
        ["bash", "-c", "source pipelines/images.env && echo $IMAGE_REGISTRY $IMAGE_TAG"],
        capture_output=True, text=True, cwd=REPO, check=True, env={"PATH": os.environ["PATH"]},
    ).stdout.split()  # fmt: skip
    return dict(zip(("IMAGE_REGISTRY", "IMAGE_TAG"), out, strict=True))


def compiled_images(path: Path) -> dict[str, str]:
    spec = next(yaml.safe_load_all(path.read_text()))
    return {n: e["container"]["image"] for n, e in spec["deploymentSpec"]["executors"].items()}


def ci_tags(kind: str, ref: str) -> list[str]:
    proc = subprocess.run(
        ["bash", str(REPO / ".ci" / "image-tags"), kind], capture_output=True, text=True,
        env={"PATH": os.environ["PATH"], "GITHUB_REF": ref, "GITHUB_SHA": SHA},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    registry = read_setting()["IMAGE_REGISTRY"]
    assert lines[:2] == [f"host={registry.split('/')[0]}", f"name={registry}/hsissl-{kind}"]
    assert lines[2] == "tags<<EOF" and lines[-1] == "EOF"
    return lines[3:-1]


def test_python_and_shell_read_the_same_setting():
    assert shell_setting() == {k: read_setting()[k] for k in ("IMAGE_REGISTRY", "IMAGE_TAG")}


def test_checked_in_pipeline_references_exactly_what_every_main_build_pushes():
    setting = shell_setting()
    images = compiled_images(GOLDEN)
    expected = {f"{setting['IMAGE_REGISTRY']}/hsissl-{k}:{setting['IMAGE_TAG']}"
                for k in ("cpu", "train")}  # fmt: skip
    assert set(images.values()) == expected
    pushed_on_main = set(ci_tags("cpu", "refs/heads/main") + ci_tags("train", "refs/heads/main"))
    assert set(images.values()) <= pushed_on_main, "the UI upload would pull an unpublished tag"
    assert not any(i.endswith(":latest") for i in images.values())


def test_ci_tags_sha_always_the_moving_tag_on_main_and_the_version_on_tags():
    name = image_ref("cpu").rsplit(":", 1)[0]
    tag = read_setting()["IMAGE_TAG"]
    assert ci_tags("cpu", "refs/heads/main") == [f"{name}:{SHA}", f"{name}:{tag}"]
    assert ci_tags("cpu", "refs/tags/v1.4.0") == [f"{name}:{SHA}", f"{name}:v1.4.0"]
    assert ci_tags("cpu", "refs/heads/feature") == [f"{name}:{SHA}"]


def test_the_environment_and_flags_move_every_reference_together(tmp_path: Path):
    out = tmp_path / "p.yaml"
    env = {**os.environ, "HSISSL_IMAGE_REGISTRY": "registry.example/team"}
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "compile", "-o", str(out), "--image-tag", "dev-1"],
        capture_output=True, text=True, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert set(compiled_images(out).values()) == {"registry.example/team/hsissl-cpu:dev-1",
                                                  "registry.example/team/hsissl-train:dev-1"}  # fmt: skip
    # make submit compiles with the same setting make images tags and pushes
    dry = subprocess.run(["make", "-n", "submit", "KFP_HOST=http://kfp", "IMAGE_TAG=dev-2"],
                         capture_output=True, text=True, cwd=REPO)  # fmt: skip
    registry = read_setting()["IMAGE_REGISTRY"]
    assert f"--image-registry {registry} --image-tag dev-2" in dry.stdout, dry.stdout + dry.stderr


@pytest.mark.parametrize("flag", ["--cpu-image=GHCR.io/x/cpu:1", "--image-tag=no/slash"])
def test_a_malformed_image_reference_is_refused_with_its_name(tmp_path: Path, flag: str):
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "compile", "-o",
                           str(tmp_path / "p.yaml"), flag], capture_output=True, text=True,
                          cwd=REPO)  # fmt: skip
    assert proc.returncode == 2 and flag.split("=", 1)[1] in proc.stderr
    assert not (tmp_path / "p.yaml").exists()


def test_workflow_builds_pushes_and_compiles_from_the_setting():
    wf = yaml.safe_load(WORKFLOW.read_text())
    # only pull-request runs are cancelled by a newer push; main and tag runs always finish
    assert wf["concurrency"]["cancel-in-progress"] == "${{ github.event_name == 'pull_request' }}"
    images = wf["jobs"]["images"]["steps"]
    ref = next(s for s in images if s.get("id") == "ref")
    assert ".ci/image-tags" in ref["run"]
    build = next(s for s in images if s.get("id") == "build")["with"]
    assert build["tags"] == "${{ steps.ref.outputs.tags }}"
    text = WORKFLOW.read_text()
    assert "GITHUB_REPOSITORY_OWNER" not in text, "the registry comes from pipelines/images.env"
    digest_step = next(s for s in images if "steps.build.outputs.digest" in str(s.get("env")))
    assert "image-${{ matrix.image }}.txt" in digest_step["run"]
    pipeline = wf["jobs"]["pipeline"]
    assert pipeline["needs"] == ["images"]
    download = next(s for s in pipeline["steps"] if "download-artifact" in s.get("uses", ""))
    upload = next(s for s in pipeline["steps"] if ".ci/upload-pipeline" in s.get("run", ""))
    assert upload["env"]["IMAGES_DIR"] == download["with"]["path"]


def _k8s_executors(path: Path) -> dict[str, dict]:
    platform = list(yaml.safe_load_all(path.read_text()))[1]
    return platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_pull_secret_and_cache_size_reach_every_pod_that_needs_them(tmp_path: Path):
    out = tmp_path / "p.yaml"
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "compile", "-o", str(out),
         "--image-pull-secret", "regcred", "--cache-size", "7Gi"],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    spec = next(yaml.safe_load_all(out.read_text()))
    executors = _k8s_executors(out)
    assert set(executors) == set(spec["deploymentSpec"]["executors"])
    opts = PipelineOptions()
    for name, k8s in executors.items():
        assert [s["secretName"] for s in k8s["imagePullSecret"]] == ["regcred"], name
        cache = [m for m in k8s.get("emptyDirMounts", []) if m["volumeName"] == "cache"]
        env = spec["deploymentSpec"]["executors"][name]["container"].get("env", [])
        stage = name.removeprefix("exec-")
        if any(stage.startswith(s) for s in ("ingest", "pca", "pretrain", "finetune", "baseline",
                                             "report")):  # fmt: skip
            assert cache == [{"mountPath": opts.cache_mount, "sizeLimit": "7Gi",
                              "volumeName": "cache"}], name  # fmt: skip
            assert {"name": "HSISSL_CACHE", "value": opts.cache_mount} in env, name
        else:  # light tasks (lineage, references) read no dataset
            assert cache == [], name
    # default: no pull secret, the default cache size
    for k8s in _k8s_executors(GOLDEN).values():
        assert "imagePullSecret" not in k8s
        assert {m.get("sizeLimit") for m in k8s.get("emptyDirMounts", [])
                if m["volumeName"] == "cache"} <= {opts.cache_size}  # fmt: skip


def test_pytorchjob_pods_pull_with_the_secret_and_cache_in_an_emptydir():
    opts = PipelineOptions(image_pull_secrets=["regcred"], cache_size="9Gi")
    job = build_pytorchjob("pretrain-mae", [], nodes=2, gpus_per_node=1, name="mae-2", opts=opts)
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        pod = replica["template"]["spec"]
        assert pod["imagePullSecrets"] == [{"name": "regcred"}]
        assert {"name": "cache", "emptyDir": {"sizeLimit": "9Gi"}} in pod["volumes"]
        (container,) = pod["containers"]
        assert {"name": "cache", "mountPath": opts.cache_mount} in container["volumeMounts"]
        assert {"name": "HSISSL_CACHE", "value": opts.cache_mount} in container["env"]


def _fake_builders(tmp_path: Path, docker_daemon: bool | None, buildah: bool) -> dict[str, str]:
    """A PATH with only the tools scripts/images.sh needs, and builders that log their argv."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname", "sed", "git", "cat"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    log = tmp_path / "calls.log"
    names = (["docker"] if docker_daemon is not None else []) + (["buildah"] if buildah else [])
    for name in names:
        info_rc = 0 if docker_daemon else 1  # `docker info` fails without a daemon
        script = f'#!/bin/bash\n[ "$1" = info ] && exit {info_rc}\necho "{name} $*" >> {log}\n'
        (bin_dir / name).write_text(script)
        (bin_dir / name).chmod(0o755)
    return {"PATH": str(bin_dir), "GIT_SHA": SHA, "LOG": str(log)}


@pytest.mark.parametrize(
    ("docker_daemon", "buildah", "expected"),
    [(True, True, "docker build"), (False, True, "buildah bud"), (None, True, "buildah bud")],
)
def test_make_images_builds_with_whichever_builder_works(
    tmp_path, docker_daemon, buildah, expected
):
    env = _fake_builders(tmp_path, docker_daemon, buildah)
    proc = subprocess.run(["/bin/bash", "scripts/images.sh", "build", "cpu"], cwd=REPO,
                          env={**env, "BASE_IMAGE": "mirror.example/python:3.11"},
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (call,) = Path(env["LOG"]).read_text().splitlines()
    assert call.startswith(expected)
    name = image_ref("cpu").rsplit(":", 1)[0]
    for part in (f"-t {image_ref('cpu')}", f"-t {name}:{SHA}", "-f images/cpu.Dockerfile",
                 f"--build-arg GIT_SHA={SHA}", "--build-arg BASE_IMAGE=mirror.example/python:3.11"):  # fmt: skip
        assert part in call
    # buildah's layer cache would keep a previous build's revision (containers/buildah#5501)
    revision = f"--label org.opencontainers.image.revision={SHA}"
    assert (revision in call) == expected.startswith("buildah")
    push = subprocess.run(["/bin/bash", "scripts/images.sh", "push", "cpu"], cwd=REPO, env=env,
                          capture_output=True, text=True)  # fmt: skip
    assert push.returncode == 0, push.stderr
    pushes = Path(env["LOG"]).read_text().splitlines()[1:]
    assert [p.split()[-1] for p in pushes] == [image_ref("cpu"), f"{name}:{SHA}"]


def test_make_images_says_what_it_needs_when_no_builder_works(tmp_path):
    env = _fake_builders(tmp_path, docker_daemon=False, buildah=False)
    proc = subprocess.run(["/bin/bash", "scripts/images.sh", "build"], cwd=REPO, env=env,
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 1
    assert "needs docker (with a running daemon), podman or buildah" in proc.stderr
