"""Multi-node pretraining as a Kubeflow Trainer v2 ``TrainJob`` (trainer.kubeflow.org/v1alpha1).

The current Kubeflow Trainer (v2) replaced the Training Operator's PyTorchJob with TrainJob:
a job names a ``ClusterTrainingRuntime`` (``runtimeRef``, default ``torch-distributed``, which
the Trainer's Helm chart installs) and sets what differs per job in ``spec.trainer``: image,
command, env, ``numNodes``, ``numProcPerNode`` and ``resourcesPerNode``. Everything else the
pods need (service account, volumes and their mounts, node selector, tolerations, pod labels)
goes into one ``runtimePatches`` entry for the runtime's ``node`` replicated job; the Trainer
merges it into the runtime's JobSet template (strategic merge).

Encodes kubeflow/trainer v2.3.0 (pkg/apis/trainer/v1alpha1/trainjob_types.go,
pkg/runtime/framework/plugins/torch/torch.go, plugins/jobset/jobset.go,
charts/kubeflow-trainer/files/runtimes/torch-distributed.yaml). ``runtimePatches`` exists from
Trainer v2.2.0 on (v2.0 had ``podSpecOverrides``, v2.1 ``podTemplateOverrides``), so v2.2 is
the floor; the launcher creates the job with ``fieldValidation=Strict`` so an older Trainer
refuses it with the unknown field named instead of dropping the patch silently.

The Torch plugin sets the rendezvous (``PET_NNODES``, ``PET_NPROC_PER_NODE``,
``PET_NODE_RANK``, ``PET_MASTER_ADDR``, ``PET_MASTER_PORT``) that torchrun reads, so the
command is the PyTorchJob's: ``torchrun -m hsissl.cli <stage> …``. Those names are reserved:
the Trainer's webhook refuses a TrainJob whose ``trainer.env`` sets one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from components.jobs.pytorchjob import GPU_RESOURCE, KUBERNETES_VERSION, pretrain_pod
from components.options import PipelineOptions

SCHEMA = Path(__file__).with_name("trainjob.schema.json")
GROUP, VERSION, KIND = "trainer.kubeflow.org", "v1alpha1", "TrainJob"
DEFAULT_RUNTIME = "torch-distributed"  # ClusterTrainingRuntime of the Trainer's Helm chart
NODE = "node"  # the runtime's replicated job and container that run the trainer
PATCH_MANAGER = "hsissl.io/launcher"  # runtimePatches[].manager: a domain-prefixed path
RESERVED_ENV = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR",
                "PET_MASTER_PORT")  # fmt: skip


def build_trainjob(stage: str, overrides: list[str], *, nodes: int, gpus_per_node: int,
                   name: str, namespace: str | None = None,
                   local_preset: str | Path | None = None, opts: PipelineOptions | None = None,
                   service_account: str = "hsissl-pipeline", run_id: str = "",
                   config: str | None = None, gpu_type: str = GPU_RESOURCE,
                   extra_env: dict[str, str] | None = None,
                   runtime: str = DEFAULT_RUNTIME) -> dict[str, Any]:  # fmt: skip
    """A TrainJob running pretraining ``stage`` on ``nodes`` x ``gpus_per_node`` GPUs with the
    pod a PyTorchJob replica would get (:func:`components.jobs.pytorchjob.pretrain_pod`: same
    checks, image, command, env, volumes and placement); ``runtime``: the
    ClusterTrainingRuntime it runs on."""
    opts = opts or PipelineOptions()
    pod = pretrain_pod(stage, overrides, nodes=nodes, gpus_per_node=gpus_per_node,
                       local_preset=local_preset, opts=opts, service_account=service_account,
                       run_id=run_id, config=config, gpu_type=gpu_type,
                       extra_env=extra_env)  # fmt: skip
    spec = pod["spec"]
    (container,) = spec["containers"]
    pod_patch: dict[str, Any] = {
        "serviceAccountName": spec["serviceAccountName"],
        "volumes": spec["volumes"],
        "containers": [{"name": NODE, "volumeMounts": container["volumeMounts"]}],
    }
    if spec.get("nodeSelector"):
        pod_patch["nodeSelector"] = spec["nodeSelector"]
    if spec.get("tolerations"):
        pod_patch["tolerations"] = spec["tolerations"]
    replicated_job = {"name": NODE, "template": {"spec": {"template": {
        "metadata": pod["metadata"], "spec": pod_patch}}}}  # fmt: skip
    metadata: dict[str, Any] = {"name": name, "labels": {"app.kubernetes.io/part-of": "hsissl",
                                                         "hsissl.io/stage": stage}}  # fmt: skip
    if namespace:
        metadata["namespace"] = namespace
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": metadata,
        "spec": {
            "runtimeRef": {"name": runtime, "apiGroup": GROUP, "kind": "ClusterTrainingRuntime"},
            "trainer": {
                "image": container["image"],
                "command": container["command"],
                "env": container["env"],
                "numNodes": nodes,
                "numProcPerNode": gpus_per_node,
                "resourcesPerNode": container["resources"],
            },
            "runtimePatches": [
                {
                    "manager": PATCH_MANAGER,
                    "trainingRuntimeSpec": {
                        "template": {"spec": {"replicatedJobs": [replicated_job]}}
                    },
                }
            ],  # fmt: skip
        },
    }


def node_pod(manifest: dict[str, Any]) -> dict[str, Any]:
    """The pod template a node of ``manifest`` gets from the trainer fields and the patch (what
    the runtime's own template adds is not known offline)."""
    trainer = manifest["spec"]["trainer"]
    (patch,) = manifest["spec"]["runtimePatches"]
    (job,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    template = job["template"]["spec"]["template"]
    spec = dict(template["spec"])
    (mounts,) = spec.pop("containers")
    container = {"name": NODE, "image": trainer["image"], "command": trainer["command"],
                 "env": trainer["env"], "resources": trainer["resourcesPerNode"],
                 "volumeMounts": mounts["volumeMounts"]}  # fmt: skip
    return {"metadata": template.get("metadata", {}), "spec": {**spec, "containers": [container]}}


def validate(manifest: dict[str, Any]) -> None:
    """Offline checks: the TrainJob fields against ``trainjob.schema.json`` (Trainer v2.3.0
    types and webhook rules), the reserved torchrun variables, and the node pod against the
    Kubernetes API schema (kubernetes-validate, strict)."""
    import jsonschema
    import kubernetes_validate

    jsonschema.validate(manifest, json.loads(SCHEMA.read_text()))
    reserved = sorted({e["name"] for e in manifest["spec"]["trainer"]["env"]} & set(RESERVED_ENV))
    if reserved:
        raise ValueError(f"spec.trainer.env sets {reserved}: reserved for the Trainer's torch "
                         "plugin, which sets the rendezvous itself")  # fmt: skip
    pod_template_object = {"apiVersion": "v1", "kind": "PodTemplate",
                           "metadata": {"name": f"{manifest['metadata']['name']}-{NODE}"},
                           "template": node_pod(manifest)}  # fmt: skip
    kubernetes_validate.validate(pod_template_object, KUBERNETES_VERSION, strict=True)
