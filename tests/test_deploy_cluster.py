"""What a cluster user trips on between the chart and the compiled pipeline: every name and key
the pipeline references exists in the chart's render (also for another release name), no Istio
sidecar on the chart's pods and the multi-node job's, S3 key names defined once."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import test_deploy
from components.jobs.pytorchjob import build_pytorchjob
from components.options import MLFLOW_SECRET_KEYS, S3_SECRET_KEYS, PipelineOptions
from pipelines.compile import compile_pipeline
from test_deploy import CHART, NAMESPACE, pod_specs, render_error, run_helm

helm = test_deploy.helm  # the session fixture (helm from .tools/bin or PATH)

ISTIO = {"sidecar.istio.io/inject": "false"}


def _render(helm: str, release: str, *args: str) -> list[dict]:
    result = run_helm(helm, "template", release, str(CHART), "--namespace", NAMESPACE, *args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def _references(path: Path) -> tuple[dict[str, set[str]], dict[str, set[str]], dict[str, bool]]:
    """Secret -> required keys, ConfigMap -> required keys, Secret -> optional, from the
    compiled pipeline's Kubernetes configs."""
    platform = list(yaml.safe_load_all(path.read_text()))[1]
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    secrets: dict[str, set[str]] = {}
    config_maps: dict[str, set[str]] = {}
    optional: dict[str, bool] = {}
    for config in executors.values():
        for ref in config.get("secretAsEnv", []):
            optional[ref["secretName"]] = ref.get("optional", False)
            keys = set() if ref.get("optional") else {k["secretKey"] for k in ref["keyToEnv"]}
            secrets.setdefault(ref["secretName"], set()).update(keys)
        for ref in config.get("configMapAsEnv", []):
            keys = {k["configMapKey"] for k in ref["keyToEnv"]}
            config_maps.setdefault(ref["configMapName"], set()).update(keys)
        for ref in config.get("configMapAsVolume", []):
            config_maps.setdefault(ref["configMapName"], set()).add("config.yaml")
    return secrets, config_maps, optional


@pytest.mark.parametrize(
    "release_args",
    [["hsissl"], ["ml", "--set", "fullnameOverride=hsissl"]],
    ids=["release-hsissl", "other-release-with-fullnameOverride"],
)
def test_every_name_the_compiled_pipeline_references_exists_in_the_chart(
    helm: str, tmp_path: Path, release_args: list[str]
) -> None:
    """Installed as documented (release hsissl, or any release with fullnameOverride=hsissl),
    the default compiled pipeline finds every Secret, key, ConfigMap and service account."""
    secrets, config_maps, optional = _references(compile_pipeline(tmp_path / "p.yaml"))
    objects = _render(helm, *release_args)
    by_kind: dict[str, dict[str, dict]] = {}
    for o in objects:
        by_kind.setdefault(o["kind"], {})[o["metadata"]["name"]] = o
    for name, keys in secrets.items():
        assert name in by_kind["Secret"], f"Secret {name} the pipeline reads is not in the chart"
        assert keys <= set(by_kind["Secret"][name].get("data") or {}), name
    assert set(S3_SECRET_KEYS) <= secrets[PipelineOptions().s3_secret]
    mlflow_secret = PipelineOptions().mlflow_secret
    assert optional[mlflow_secret] and by_kind["Secret"][mlflow_secret].get("data") in ({}, None)
    for name, keys in config_maps.items():
        assert keys <= set(by_kind["ConfigMap"][name]["data"]), name
    assert PipelineOptions().pytorchjob_service_account in by_kind["ServiceAccount"]


def test_s3_key_names_are_fixed_in_the_chart_as_the_pipeline_reads_them(helm: str) -> None:
    objects = _render(helm, "hsissl")
    for kind_name, template in pod_specs(objects):
        for container in template["spec"]["containers"]:
            for var in container.get("env", []):
                ref = (var.get("valueFrom") or {}).get("secretKeyRef") or {}
                if ref.get("name") == "hsissl-s3":
                    assert ref["key"] in S3_SECRET_KEYS, kind_name
    error = render_error(helm, "--set", "objectStorage.credentials.accessKeyIdKey=accesskey")
    assert "accessKeyIdKey" in error  # the schema refuses a rename the pipeline would not see


def test_an_existing_mlflow_secret_replaces_the_empty_one(helm: str) -> None:
    objects = _render(helm, "hsissl", "--set", "mlflow.auth.existingSecret=mlflow-creds")
    assert not [o for o in objects if o["kind"] == "Secret" and o["metadata"]["name"] ==
                "hsissl-mlflow"]  # fmt: skip


def test_chart_pods_opt_out_of_the_istio_sidecar_unless_told_otherwise(helm: str) -> None:
    templates = pod_specs(_render(helm, "hsissl"))
    assert {n.split("/")[1] for n, _ in templates} >= {"hsissl-mlflow", "hsissl-minio",
                                                      "hsissl-postgres", "hsissl-create-buckets"}  # fmt: skip
    for name, template in templates:
        annotations = template["metadata"].get("annotations") or {}
        assert annotations.get("sidecar.istio.io/inject") == "false", name
    injected = _render(helm, "hsissl", "--set-string",
                       r"podAnnotations.sidecar\.istio\.io/inject=true")  # fmt: skip
    for name, template in pod_specs(injected):
        assert template["metadata"]["annotations"]["sidecar.istio.io/inject"] == "true", name


def test_multi_node_job_pods_opt_out_of_the_istio_sidecar() -> None:
    job = build_pytorchjob("pretrain-mae", [], nodes=2, gpus_per_node=1, name="mae-x")
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        assert replica["template"]["metadata"]["annotations"] == ISTIO
    plain = build_pytorchjob("pretrain-mae", [], nodes=2, gpus_per_node=1, name="mae-x",
                             opts=PipelineOptions(job_pod_annotations={}))  # fmt: skip
    assert (
        "annotations" not in plain["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["metadata"]
    )
    assert set(MLFLOW_SECRET_KEYS) == {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
