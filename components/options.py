"""Compile-time settings of the pipeline: images, Kubernetes names, resources, GPU placement.

The defaults match the Helm chart in ``charts/hsissl`` installed as release ``hsissl``.
``hsissl-pipeline compile --help`` lists the flags for what differs between clusters and
releases (images, Secret and ConfigMap names, the PyTorchJob service account, GPU placement,
/dev/shm, the data PVC; ``pipelines.compile.add_options``); resources and retries change here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from components.base import CPU_IMAGE, TRAIN_IMAGE

# Environment of every pipeline pod, from the chart's ConfigMap (key -> env var).
ENV_FROM_CONFIG_MAP = {k: k for k in ("HSISSL_S3_ENDPOINT", "AWS_REGION", "MLFLOW_TRACKING_URI")}
S3_SECRET_KEYS = {k: k for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
MLFLOW_SECRET_KEYS = {k: k for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
MULTI_NODE_APIS = ("auto", "trainjob", "pytorchjob")  # PipelineOptions.multi_node_api
# KFP labels every pod of a run with its run id; components read it for lineage and checkpoints.
RUN_ID_FIELD = "metadata.labels['pipeline/runid']"


@dataclass(frozen=True)
class Resources:
    cpu: str  # request
    memory: str  # request and limit


@dataclass(frozen=True)
class Retry:
    attempts: int = 3
    backoff: str = "60s"
    factor: float = 2.0
    max_backoff: str = "3600s"


@dataclass(frozen=True)
class PipelineOptions:
    cpu_image: str = CPU_IMAGE
    train_image: str = TRAIN_IMAGE
    s3_secret: str = "hsissl-s3"
    mlflow_secret: str = "hsissl-mlflow"  # optional: only for an MLflow server with auth
    env_config_map: str = "hsissl-pipeline-env"
    config_map: str = "hsissl-pipeline-config"  # holds config.yaml, the cluster preset
    config_mount: str = "/etc/hsissl"
    pod_labels: dict[str, str] = field(default_factory=lambda: {"hsissl.io/pipeline": "true"})
    # Annotations of the multi-node job's pods (KFP's own step pods already opt out of Istio):
    # an Istio sidecar would keep a finished replica running and intercept NCCL's ports.
    job_pod_annotations: dict[str, str] = field(
        default_factory=lambda: {"sidecar.istio.io/inject": "false"}
    )
    gpu_node_selector: dict[str, str] = field(
        default_factory=lambda: {"nvidia.com/gpu.present": "true"}
    )
    gpu_tolerations: list[dict[str, str]] = field(
        default_factory=lambda: [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
    )
    shm_size: str = "16Gi"  # /dev/shm for DataLoader workers (memory-backed emptyDir)
    # The shard download cache ($HSISSL_CACHE) of the stages that read a dataset: an emptyDir
    # of at most cache_size (about the dataset size), not the container's writable layer.
    cache_size: str = "100Gi"
    cache_mount: str = "/var/cache/hsissl"
    # Secrets for pulling the images from a private registry (pod imagePullSecrets).
    image_pull_secrets: list[str] = field(default_factory=list)
    data_pvc: str = ""  # a PersistentVolumeClaim with WHU-OHS, mounted into ingest at data_mount
    data_mount: str = "/data"
    light: Resources = Resources("250m", "1Gi")  # lineage, references
    cpu: Resources = Resources("4", "16Gi")  # ingest, pca-poc, report
    train: Resources = Resources("8", "64Gi")  # pretraining, finetuning, baseline
    retry: Retry = Retry()
    # Pods of the multi-node PyTorchJob run as this service account (the chart's pipeline one;
    # the KFP run's own service account is chosen at submit time, not compiled in).
    pytorchjob_service_account: str = "hsissl-pipeline"
    # nodes > 1: "auto" = a Trainer v2 TrainJob if the cluster serves one, else a PyTorchJob
    # (components.jobs.multinode); "trainjob" / "pytorchjob" insist on one.
    multi_node_api: str = "auto"
    trainjob_runtime: str = "torch-distributed"  # the ClusterTrainingRuntime TrainJobs name

    @property
    def default_preset(self) -> str:
        return f"{self.config_mount}/config.yaml"

    def to_json(self) -> str:
        """These options as JSON: what the launch-pytorchjob task gets, so the multi-node job's
        pods are built with the images, Secrets and GPU placement the pipeline was compiled
        with."""
        return json.dumps(asdict(self), sort_keys=True)

    def placed(self, node_selector: dict[str, str] | None,
               tolerations: list[dict[str, Any]] | None) -> PipelineOptions:  # fmt: skip
        """These options with a run's GPU placement (the run parameters; None keeps ours)."""
        opts = self
        if node_selector is not None:
            opts = replace(opts, gpu_node_selector=dict(node_selector))
        if tolerations is not None:
            opts = replace(opts, gpu_tolerations=[dict(t) for t in tolerations])
        return opts

    @classmethod
    def from_json(cls, text: str) -> PipelineOptions:
        """Options from :meth:`to_json`; keys left out keep their defaults."""
        data = json.loads(text or "{}")
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"pipeline options JSON: unknown key(s) {unknown}; expected some of "
                             f"{sorted(cls.__dataclass_fields__)}")  # fmt: skip
        for key in ("light", "cpu", "train"):
            if key in data:
                data[key] = Resources(**data[key])
        if "retry" in data:
            data["retry"] = Retry(**data["retry"])
        return cls(**data)
