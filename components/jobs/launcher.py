"""Multi-node pretraining inside the DAG: what the launch-pytorchjob task does in its pod.

It finds the cluster's multi-node job API (``components.jobs.multinode``: a Kubeflow Trainer v2
``TrainJob``, else a Training Operator v1 ``PyTorchJob``, or the one compiled in), builds the
job of one pretraining (``components.jobs.trainjob`` / ``components.jobs.pytorchjob``) from the same
preset, overrides and run id as the single-pod pretrain task, creates it through the
Kubernetes API, waits for the operator to finish it and emits the same outputs: an encoder
Model pointing at ``checkpoints/<method>-<run id>/encoder.pt`` and the training Metrics, so
finetune-heads downstream works unchanged. The pod itself needs no GPU.

Idempotent: the job's name follows from the checkpoint folder and run id, so a retried task
adopts the job an earlier attempt created (HTTP 409) and waits for it. A job an earlier
attempt left Failed is deleted and created again; the trainer resumes from its last
checkpoint, as a retried single pod does. On timeout the job is deleted (its GPUs freed; the
checkpoints stay, so a retry resumes).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Any

from components import runtime
from components.jobs.multinode import PYTORCHJOB, JobKind, TrainingJobError, detect, kind_of
from components.options import PipelineOptions
from components.pretrain_task import pretrain_config, publish_pretrain
from components.report_failure import SA_NAMESPACE_FILE
from hsissl import tracking_lineage as lineage
from hsissl.layout import TRAIN_STATE, checkpoint_key, storage_of
from hsissl.presets import managed_overrides, resolve_preset
from hsissl.stages.pretrained import stored_result
from hsissl.stages.results import PretrainResult
from hsissl.tracking import PARENT_RUN_ENV

log = logging.getLogger("hsissl.launcher")

# Pod and service names grow by the operator's suffixes (PyTorchJob <job>-worker-<i>, TrainJob
# <job>-node-<i>-<j>), 63 characters at most.
NAME_LIMIT = 48
MAX_API_ERRORS = 5  # consecutive failed status reads (5xx, connection) before giving up
GONE_TIMEOUT_S = 300.0  # how long a deleted job may take to disappear before it is recreated


PyTorchJobError = TrainingJobError  # the name before TrainJob support


def job_name(checkpoint: str, run_id: str) -> str:
    """A DNS-1035 name from the checkpoint folder (``mae-<run id>``) and the run id: the same
    in every attempt of one task, different for every pipeline run."""
    base = checkpoint if not run_id or run_id in checkpoint else f"{checkpoint}-{run_id}"
    name = re.sub(r"[^a-z0-9-]+", "-", base.lower()).strip("-")
    if not name[:1].isalpha():
        name = f"pt-{name}"
    if len(name) > NAME_LIMIT:  # cut, and keep it unique with a hash of the whole
        digest = hashlib.sha1(base.encode()).hexdigest()[:8]
        name = f"{name[: NAME_LIMIT - 9].rstrip('-')}-{digest}"
    return name


def current_namespace(explicit: str = "") -> str:
    """``explicit``, else this pod's namespace (its service account's), else the kubeconfig
    context's, else ``default``."""
    if explicit:
        return explicit
    if SA_NAMESPACE_FILE.is_file():
        return SA_NAMESPACE_FILE.read_text().strip()
    try:
        from kubernetes import config

        _, active = config.list_kube_config_contexts(os.environ.get("KUBECONFIG") or None)
        return active["context"].get("namespace") or "default"
    except Exception:  # no kubeconfig: kubectl's default as well
        return "default"


def connect() -> Any:
    """The CustomObjectsApi of this cluster: in-cluster config in a pod, else the kubeconfig."""
    from kubernetes import client, config

    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config()
        else:
            config.load_kube_config(os.environ.get("KUBECONFIG") or None)  # read now, not at import
    except config.ConfigException as exc:
        raise TrainingJobError(
            f"no Kubernetes API to create the multi-node job: {exc} (expected the pod's service "
            "account, or a kubeconfig at $KUBECONFIG / ~/.kube/config)"
        ) from exc
    return client.CustomObjectsApi()


def state_of(job: dict[str, Any], kind: JobKind = PYTORCHJOB) -> tuple[str, dict[str, Any]]:
    """(Succeeded | Failed | the latest true condition type | Pending, that condition); the
    kind's success condition (TrainJob ``Complete``, PyTorchJob ``Succeeded``) is Succeeded."""
    conditions = [c for c in (job.get("status") or {}).get("conditions") or []
                  if str(c.get("status")) == "True"]  # fmt: skip
    for terminal, state in (("Failed", "Failed"), (kind.succeeded, "Succeeded")):
        for condition in conditions:
            if condition.get("type") == terminal:
                return state, condition
    if conditions:
        return str(conditions[-1].get("type")), conditions[-1]
    return "Pending", {}


def _describe(kind: JobKind, namespace: str, name: str, condition: dict[str, Any]) -> str:
    reason = condition.get("reason") or "no reason given"
    message = condition.get("message") or "no message"
    return (f"{kind.kind} {namespace}/{name}: {reason}: {message} "
            f"({kind.describe(namespace, name)})")  # fmt: skip


def _api_error(kind: JobKind, action: str, namespace: str, name: str,
               exc: Exception) -> TrainingJobError:  # fmt: skip
    detail = getattr(exc, "body", None) or exc
    status = getattr(exc, "status", "")
    hint = ""
    if kind.key == "trainjob" and status in (400, 422) and "runtimePatches" in str(detail):
        hint = f" (this Trainer predates runtimePatches: the launcher needs {kind.install})"
    elif kind.key == "trainjob" and status in (400, 422) and "runtime" in str(detail).lower():
        hint = (" (is the ClusterTrainingRuntime there? kubectl get clustertrainingruntimes; "
                "another one: compile with --trainjob-runtime NAME)")  # fmt: skip
    return TrainingJobError(f"{action} {kind.kind} {namespace}/{name}: HTTP {status} "
                            f"{detail}{hint}")  # fmt: skip


def _get(api: Any, kind: JobKind, namespace: str, name: str) -> dict[str, Any]:
    return api.get_namespaced_custom_object(kind.group, kind.version, namespace, kind.plural,
                                            name)  # fmt: skip


def _create(api: Any, kind: JobKind, namespace: str, manifest: dict[str, Any]) -> dict:
    # Strict: a field the cluster's CRD lacks (an older operator) fails the create, named,
    # instead of being dropped with a warning (the API server's default since 1.27).
    return api.create_namespaced_custom_object(kind.group, kind.version, namespace, kind.plural,
                                               manifest, field_validation="Strict")  # fmt: skip


def delete(api: Any, namespace: str, name: str, wait_s: float = 0.0,
           kind: JobKind = PYTORCHJOB) -> None:  # fmt: skip
    """Delete the job and its pods; with ``wait_s``, wait until it is gone."""
    from kubernetes.client.exceptions import ApiException

    try:
        api.delete_namespaced_custom_object(kind.group, kind.version, namespace, kind.plural,
                                            name, propagation_policy="Background")  # fmt: skip
    except ApiException as exc:
        if exc.status != 404:
            raise _api_error(kind, "deleting", namespace, name, exc) from exc
    deadline = time.monotonic() + wait_s
    while wait_s:
        try:
            _get(api, kind, namespace, name)
        except ApiException as exc:
            if exc.status == 404:
                return
            raise _api_error(kind, "reading", namespace, name, exc) from exc
        if time.monotonic() > deadline:
            raise TrainingJobError(f"{kind.kind} {namespace}/{name} still exists {wait_s:.0f} s "
                                   "after it was deleted (a finalizer holding it?)")  # fmt: skip
        time.sleep(0.5)


def create_or_adopt(api: Any, namespace: str, manifest: dict[str, Any]) -> tuple[dict, bool]:
    """Create the job; if one of that name exists (a retried task), adopt it, unless it has
    Failed: then it is deleted and created again. Returns (job, adopted)."""
    from kubernetes.client.exceptions import ApiException

    kind = kind_of(manifest)
    name = manifest["metadata"]["name"]
    try:
        return _create(api, kind, namespace, manifest), False
    except ApiException as exc:
        if exc.status != 409:
            raise _api_error(kind, "creating", namespace, name, exc) from exc
    try:
        existing = _get(api, kind, namespace, name)
    except ApiException as exc:  # e.g. no "get" in the Role
        raise _api_error(kind, "adopting the existing", namespace, name, exc) from exc
    state, condition = state_of(existing, kind)
    if state != "Failed":
        log.info("%s %s/%s already exists (%s): adopting it", kind.kind, namespace, name, state)
        return existing, True
    log.warning("%s; an earlier attempt left it Failed: deleting it and starting again "
                "(training resumes from the last checkpoint)",
                _describe(kind, namespace, name, condition))  # fmt: skip
    delete(api, namespace, name, wait_s=GONE_TIMEOUT_S, kind=kind)
    try:
        return _create(api, kind, namespace, manifest), True
    except ApiException as exc:
        raise _api_error(kind, "recreating", namespace, name, exc) from exc


def wait(api: Any, namespace: str, name: str, timeout_s: float, poll_s: float = 30.0,
         kind: JobKind = PYTORCHJOB) -> dict[str, Any]:  # fmt: skip
    """Poll the job's conditions until Succeeded (returns the job) or Failed (raises). Polls
    after 1 s, then doubling up to ``poll_s``; deletes the job when ``timeout_s`` runs out."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    deadline = time.monotonic() + timeout_s
    interval, errors, last = min(1.0, poll_s), 0, ""
    condition: dict[str, Any] = {}
    while True:
        try:
            job = _get(api, kind, namespace, name)
            errors = 0
        except ApiException as exc:
            if exc.status == 404:
                raise TrainingJobError(f"{kind.kind} {namespace}/{name} disappeared while this "
                                       "task waited for it (deleted by someone else?)") from exc  # fmt: skip
            if exc.status < 500 or errors >= MAX_API_ERRORS:
                raise _api_error(kind, "reading", namespace, name, exc) from exc
            errors += 1
        except HTTPError as exc:  # the API server unreachable for a moment
            if errors >= MAX_API_ERRORS:
                raise _api_error(kind, "reading", namespace, name, exc) from exc
            errors += 1
        else:
            state, condition = state_of(job, kind)
            if state != last:
                log.info("%s %s/%s: %s", kind.kind, namespace, name, state)
                last = state
            if state == "Succeeded":
                return job
            if state == "Failed":
                raise TrainingJobError(f"failed: {_describe(kind, namespace, name, condition)}")
        left = deadline - time.monotonic()
        if left <= 0:
            delete(api, namespace, name, kind=kind)
            raise TimeoutError(
                f"{kind.kind} {namespace}/{name} not finished after {timeout_s:.0f} s (last "
                f"state {last or 'unknown'}: {condition.get('message') or 'no message'}); "
                "deleted it to free its GPUs, its checkpoints stay (a retry resumes)"
            )
        time.sleep(min(interval, left))
        interval = min(interval * 2, poll_s)


@dataclass
class LaunchRequest:
    """One multi-node pretraining, as the launch-pytorchjob task's parameters give it."""

    method: str  # mae | dinov2 | ssvit
    dataset: Any  # the Dataset input artifact
    preset: str
    overrides: list[str]
    tracking_uri: str
    epochs: float  # 0: the preset's
    max_steps: int  # 0: the preset's
    kfp_run_id: str
    nodes: int
    gpus_per_node: int
    gpu_type: str  # the resource name, e.g. nvidia.com/gpu
    options: str  # the compile-time PipelineOptions as JSON
    namespace: str = ""  # "": this pod's
    timeout_s: float = 7 * 24 * 3600.0  # then the job is deleted (its checkpoints stay)
    node_selector: dict[str, str] | None = None  # the run's GPU placement; None: the options'
    tolerations: list[dict[str, Any]] | None = None


def launch(request: LaunchRequest, encoder: Any, metrics: Any, *, api: Any = None,
           poll_s: float = 30.0) -> PretrainResult:  # fmt: skip
    """Pretrain as a TrainJob or PyTorchJob (``options.multi_node_api``, default: what the
    cluster serves) of ``nodes`` x ``gpus_per_node`` and publish its encoder and metrics like
    ``components.runtime.pretrain``; ``api``: a CustomObjectsApi (default: :func:`connect`)."""
    r = request
    runtime.setup_logging()
    cfg, wiring = pretrain_config(r.method, r.dataset, r.preset, r.overrides,
                                          r.tracking_uri, r.epochs, r.max_steps, r.kfp_run_id)  # fmt: skip
    run_id = lineage.pipeline_run_id(r.kfp_run_id)
    opts = PipelineOptions.from_json(r.options).placed(r.node_selector, r.tolerations)
    parent = lineage.join_parent_run(cfg, r.kfp_run_id)  # the job's MLflow run nests under it
    preset_path = resolve_preset(r.preset)
    namespace = current_namespace(r.namespace)
    api = api or connect()
    kind = detect(api, opts.multi_node_api)
    extra = {"runtime": opts.trainjob_runtime} if kind.key == "trainjob" else {}
    manifest = kind.build(
        f"pretrain-{r.method}", [*r.overrides, *managed_overrides(wiring)], nodes=r.nodes,
        gpus_per_node=r.gpus_per_node, name=job_name(cfg.pretrain.name, run_id),
        namespace=namespace, local_preset=preset_path, opts=opts,
        service_account=opts.pytorchjob_service_account, run_id=run_id,
        config=str(preset_path) if preset_path else "", gpu_type=r.gpu_type,
        extra_env={PARENT_RUN_ENV: parent} if parent else {}, **extra,
    )  # fmt: skip
    kind.validate(manifest)
    store = storage_of(cfg)
    had_checkpoint = store.exists(checkpoint_key(cfg.pretrain.name, TRAIN_STATE))
    name = manifest["metadata"]["name"]
    _, adopted = create_or_adopt(api, namespace, manifest)
    log.info("%s %s/%s: %d node(s) x %d GPU(s), checkpoints in %s", kind.kind, namespace, name,
             r.nodes, r.gpus_per_node, store.join(checkpoint_key(cfg.pretrain.name)))  # fmt: skip
    wait(api, namespace, name, r.timeout_s, poll_s, kind=kind)
    result = stored_result(cfg, resumed=adopted or had_checkpoint)
    publish_pretrain(r.method, result, encoder, metrics)
    return result
