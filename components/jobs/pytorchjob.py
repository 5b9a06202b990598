"""Multi-node pretraining as a Kubeflow Training Operator ``PyTorchJob`` (torchrun + NCCL).

For runs that outgrow one node: the DAG's launch-pytorchjob task (pipeline parameter
``nodes`` > 1, ``components.jobs.launcher``) creates it and waits for it, and
``hsissl-pipeline pytorchjob --stage pretrain-mae --nodes 4`` prints one for ``kubectl apply``.
One Master and ``nodes - 1`` Workers, each running ``torchrun -m hsissl.cli <stage>`` with
``nproc_per_node`` = GPUs per node; the operator sets the rendezvous (``PET_NNODES``,
``PET_NODE_RANK``, ``PET_MASTER_ADDR`` …) that torchrun reads. The pods get what pipeline
pods get: the same image, config preset, Secrets and ConfigMap env, GPU placement and a
memory-backed /dev/shm. Because the trainer checkpoints and resumes exactly, a restarted
replica (``restartPolicy: OnFailure``) continues the run.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

from components.options import (
    ENV_FROM_CONFIG_MAP,
    MLFLOW_SECRET_KEYS,
    S3_SECRET_KEYS,
    PipelineOptions,
)
from hsissl import methods
from hsissl.config import load_config

SCHEMA = Path(__file__).with_name("pytorchjob.schema.json")
KUBERNETES_VERSION = "1.35.0"  # pod templates are validated against this API version
GPU_RESOURCE = "nvidia.com/gpu"


def _env(opts: PipelineOptions, extra: dict[str, str]) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in extra.items()]
    for key, name in S3_SECRET_KEYS.items():
        env.append(
            {"name": name, "valueFrom": {"secretKeyRef": {"name": opts.s3_secret, "key": key}}}
        )
    for key, name in MLFLOW_SECRET_KEYS.items():
        ref = {"name": opts.mlflow_secret, "key": key, "optional": True}
        env.append({"name": name, "valueFrom": {"secretKeyRef": ref}})
    for key, name in ENV_FROM_CONFIG_MAP.items():
        env.append(
            {
                "name": name,
                "valueFrom": {"configMapKeyRef": {"name": opts.env_config_map, "key": key}},
            }
        )
    return env


def pod_template(stage: str, overrides: list[str], gpus_per_node: int, opts: PipelineOptions,
                 service_account: str, extra_env: dict[str, str], *, config: str | None = None,
                 gpu_type: str = GPU_RESOURCE) -> dict[str, Any]:  # fmt: skip
    """The pod of every replica: container ``pytorch`` running torchrun on ``stage``.

    ``config``: the preset path in the pod (None = the chart's ConfigMap, mounted at the same
    place as in KFP pods; "" = the dataclass defaults).
    """
    preset = opts.default_preset if config is None else config
    command = ["torchrun", "-m", "hsissl.cli", stage, *(["--config", preset] if preset else []),
               *overrides]  # fmt: skip
    base_env = {"NCCL_DEBUG": "WARN", "PYTHONUNBUFFERED": "1", "HSISSL_CACHE": opts.cache_mount}
    container = {
        "name": "pytorch",  # the name the training operator looks for
        "image": opts.train_image,
        "command": command,
        "env": _env(opts, {**base_env, **extra_env}),
        "resources": {
            "requests": {
                "cpu": opts.train.cpu,
                "memory": opts.train.memory,
                gpu_type: str(gpus_per_node),
            },
            "limits": {"memory": opts.train.memory, gpu_type: str(gpus_per_node)},
        },  # fmt: skip
        "volumeMounts": [
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "config", "mountPath": opts.config_mount, "readOnly": True},
            {"name": "cache", "mountPath": opts.cache_mount},
        ],  # fmt: skip
    }
    return {
        "metadata": {
            "labels": dict(opts.pod_labels),
            **({"annotations": dict(opts.job_pod_annotations)} if opts.job_pod_annotations else {}),
        },  # fmt: skip
        "spec": {
            "serviceAccountName": service_account,
            "containers": [container],
            "volumes": [
                {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": opts.shm_size}},
                {"name": "config", "configMap": {"name": opts.config_map}},
                {"name": "cache", "emptyDir": {"sizeLimit": opts.cache_size}},
            ],
            "imagePullSecrets": [{"name": s} for s in opts.image_pull_secrets],
            "nodeSelector": dict(opts.gpu_node_selector),
            "tolerations": [dict(t) for t in opts.gpu_tolerations],
        },
    }


def pretrain_pod(stage: str, overrides: list[str], *, nodes: int, gpus_per_node: int,
                 local_preset: str | Path | None, opts: PipelineOptions, service_account: str,
                 run_id: str, config: str | None, gpu_type: str,
                 extra_env: dict[str, str] | None) -> dict[str, Any]:  # fmt: skip
    """The pod every node of a multi-node pretraining runs (PyTorchJob replica or TrainJob
    node), after checking the stage, the sizes and the ``overrides`` against the config
    schema (over ``local_preset``, default the dataclass defaults)."""
    method = methods.of_stage(stage)
    if method is None:
        known = [m.stage for m in methods.registered()]
        raise ValueError(f"stage {stage!r}: a multi-node job runs one of {known}")
    if nodes < 1 or gpus_per_node < 1:
        raise ValueError(f"nodes={nodes}, gpus_per_node={gpus_per_node}: both must be >= 1")
    cfg = load_config(local_preset, overrides)  # validates keys and types
    if run_id and not cfg.pretrain.name:
        overrides = [*overrides, f"pretrain.name={method.name}-{run_id}"]
    env = {**({"KFP_RUN_ID": run_id} if run_id else {}), **(extra_env or {})}
    return pod_template(stage, overrides, gpus_per_node, opts, service_account, env,
                        config=config, gpu_type=gpu_type)  # fmt: skip


def build_pytorchjob(stage: str, overrides: list[str], *, nodes: int, gpus_per_node: int,
                     name: str, namespace: str | None = None, local_preset: str | Path | None = None,
                     opts: PipelineOptions | None = None, service_account: str = "hsissl-pipeline",
                     run_id: str = "", backoff_limit: int = 3, config: str | None = None,
                     gpu_type: str = GPU_RESOURCE,
                     extra_env: dict[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    """A PyTorchJob manifest for a pretraining ``stage`` with config ``overrides``.

    The overrides are checked here against the config schema (over ``local_preset``, default
    the dataclass defaults), so a typo fails now rather than on the cluster. ``run_id`` names
    the checkpoint folder (``pretrain.name``) and tags the MLflow runs, like a pipeline run.
    ``config`` is the preset path inside the pods (default: the chart's ConfigMap);
    ``extra_env``: literal environment of every replica (e.g. the MLflow parent run).
    """
    opts = opts or PipelineOptions()
    template = pretrain_pod(stage, overrides, nodes=nodes, gpus_per_node=gpus_per_node,
                            local_preset=local_preset, opts=opts,
                            service_account=service_account, run_id=run_id, config=config,
                            gpu_type=gpu_type, extra_env=extra_env)  # fmt: skip
    replicas = {"Master": {"replicas": 1, "restartPolicy": "OnFailure", "template": template}}
    if nodes > 1:
        replicas["Worker"] = {"replicas": nodes - 1, "restartPolicy": "OnFailure",
                              "template": copy.deepcopy(template)}  # fmt: skip
    metadata: dict[str, Any] = {"name": name, "labels": {"app.kubernetes.io/part-of": "hsissl",
                                                         "hsissl.io/stage": stage}}  # fmt: skip
    if namespace:
        metadata["namespace"] = namespace
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": metadata,
        "spec": {
            "nprocPerNode": str(gpus_per_node),
            "runPolicy": {"cleanPodPolicy": "None", "backoffLimit": backoff_limit},
            "pytorchReplicaSpecs": replicas,
        },
    }


def check_k8s_name(flag: str, text: str) -> None:
    """Raise ValueError unless ``text`` is a Kubernetes object name: the metadata.name rule of
    ``pytorchjob.schema.json`` (RFC 1123 label), checked before a manifest is built."""
    rule = json.loads(SCHEMA.read_text())["properties"]["metadata"]["properties"]["name"]
    if not re.fullmatch(rule["pattern"], text):
        raise ValueError(
            f"{flag} {text!r} is not a Kubernetes name: lowercase RFC 1123 label, at most 63 "
            "characters of a-z, 0-9 and '-', starting and ending with a letter or digit"
        )


def validate(manifest: dict[str, Any]) -> None:
    """Offline checks: the PyTorchJob fields against ``pytorchjob.schema.json``, each replica's
    pod template against the Kubernetes API schema (kubernetes-validate, strict)."""
    import jsonschema
    import kubernetes_validate

    jsonschema.validate(manifest, json.loads(SCHEMA.read_text()))
    for role, spec in manifest["spec"]["pytorchReplicaSpecs"].items():
        pod_template_object = {"apiVersion": "v1", "kind": "PodTemplate",
                               "metadata": {"name": f"{manifest['metadata']['name']}-{role.lower()}"},
                               "template": spec["template"]}  # fmt: skip
        kubernetes_validate.validate(pod_template_object, KUBERNETES_VERSION, strict=True)
