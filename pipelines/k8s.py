"""Kubernetes settings of one task (kfp-kubernetes): the same for the DAG and one-stage reruns."""

from __future__ import annotations

from typing import Literal

from kfp import dsl, kubernetes
from kfp.dsl.pipeline_channel import PipelineChannel

from components.options import (
    ENV_FROM_CONFIG_MAP,
    MLFLOW_SECRET_KEYS,
    RUN_ID_FIELD,
    S3_SECRET_KEYS,
    PipelineOptions,
)

Kind = Literal["light", "cpu", "train"]


def configure(
    task: dsl.PipelineTask,
    kind: Kind,
    opts: PipelineOptions,
    *,
    cache: bool,
    retry: bool = False,
    name: str | None = None,
    gpus: object = None,
    gpu_type: object = None,
    node_selector: object = None,
    tolerations: object = None,
) -> dsl.PipelineTask:
    """Image (and pull secrets), resources, caching, retries, env from Secrets/ConfigMap, the
    shard cache emptyDir (``cpu``/``train``), and for ``train`` tasks GPUs (``gpus``/
    ``gpu_type``: pipeline parameters), GPU node placement (``node_selector``/``tolerations``:
    pipeline parameters, else the compile-time ``opts``) and /dev/shm."""
    task.set_container_image(opts.train_image if kind == "train" else opts.cpu_image)
    resources = {"light": opts.light, "cpu": opts.cpu, "train": opts.train}[kind]
    task.set_cpu_request(resources.cpu)
    task.set_memory_request(resources.memory)
    task.set_memory_limit(resources.memory)
    task.set_caching_options(cache)
    if retry:
        r = opts.retry
        task.set_retry(r.attempts, backoff_duration=r.backoff, backoff_factor=r.factor,
                       backoff_max_duration=r.max_backoff)  # fmt: skip
    if name:
        task.set_display_name(name)
    # Credentials only by reference: the compiled YAML names Secrets, never values.
    kubernetes.use_secret_as_env(task, opts.s3_secret, S3_SECRET_KEYS)
    kubernetes.use_secret_as_env(task, opts.mlflow_secret, MLFLOW_SECRET_KEYS, optional=True)
    kubernetes.use_config_map_as_env(task, opts.env_config_map, ENV_FROM_CONFIG_MAP)
    kubernetes.use_config_map_as_volume(task, opts.config_map, mount_path=opts.config_mount)
    kubernetes.use_field_path_as_env(task, "KFP_RUN_ID", RUN_ID_FIELD)
    for key, value in opts.pod_labels.items():
        kubernetes.add_pod_label(task, key, value)
    if opts.image_pull_secrets:
        kubernetes.set_image_pull_secrets(task, list(opts.image_pull_secrets))
    if kind != "light":  # the stages that may download a dataset's shards
        kubernetes.empty_dir_mount(task, "cache", opts.cache_mount, size_limit=opts.cache_size)
        task.set_env_variable("HSISSL_CACHE", opts.cache_mount)
    if kind == "train":
        task.set_accelerator_type(gpu_type)
        task.set_accelerator_limit(gpus)
        # kfp 2.17 does not register these as task inputs, so a task inside dsl.If/ParallelFor
        # would reference parameters its group never receives (fails in the cluster and locally)
        task.register_pipeline_channels(
            [c for c in (gpus, gpu_type) if isinstance(c, PipelineChannel)]
        )
        _place_on_gpu_nodes(task, opts, node_selector, tolerations)
        kubernetes.empty_dir_mount(
            task, "dshm", "/dev/shm", medium="Memory", size_limit=opts.shm_size
        )
    return task


def _place_on_gpu_nodes(task: dsl.PipelineTask, opts: PipelineOptions, node_selector: object,
                        tolerations: object) -> None:  # fmt: skip
    """Run parameters go in kfp-kubernetes' JSON forms (``node_selector_json``,
    ``toleration_json``: KFP backend >= 2.5), resolved by the driver when the pod is made."""
    if isinstance(node_selector, PipelineChannel):
        kubernetes.add_node_selector_json(task, node_selector)
    else:
        for key, value in opts.gpu_node_selector.items():
            kubernetes.add_node_selector(task, key, value)
    if isinstance(tolerations, PipelineChannel):
        kubernetes.add_toleration_json(task, tolerations)
    else:
        for toleration in opts.gpu_tolerations:
            kubernetes.add_toleration(task, **toleration)


def mount_data(task: dsl.PipelineTask, opts: PipelineOptions, claim: object = None
               ) -> dsl.PipelineTask:  # fmt: skip
    """The PVC holding the source scenes (``source`` = a folder under ``opts.data_mount``),
    only when compiled with one (``opts.data_pvc``): there is no "no claim" value for a mount,
    so whether to mount is fixed at compile time. Which claim is the run parameter ``claim``
    (kfp-kubernetes ``pvc_name_parameter``, backend >= 2.5), defaulting to ``opts.data_pvc``."""
    if opts.data_pvc:
        kubernetes.mount_pvc(task, claim if claim is not None else opts.data_pvc,
                             mount_path=opts.data_mount)  # fmt: skip
    return task
