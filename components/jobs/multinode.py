"""Which multi-node job API the cluster has: Kubeflow Trainer v2 ``TrainJob`` or Training
Operator v1 ``PyTorchJob``, found by API discovery or chosen by ``--multi-node-api``.

Discovery reads ``GET /apis/<group>/<version>`` (the APIResourceList of the group), which the
default ``system:discovery`` ClusterRole lets every authenticated service account read, so it
needs nothing in the chart's Role. With both installed, ``auto`` takes TrainJob: Trainer v2 is
what current Kubeflow ships; the Training Operator v1 is in maintenance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from components.jobs import pytorchjob, trainjob
from components.options import MULTI_NODE_APIS as CHOICES

TRAINER_DOCS = "https://www.kubeflow.org/docs/components/trainer/"


class TrainingJobError(RuntimeError):
    """The multi-node job failed, vanished, or could not be created."""


class NoTrainerError(TrainingJobError):
    """The cluster serves neither (or not the chosen) multi-node job API."""


@dataclass(frozen=True)
class JobKind:
    key: str  # the --multi-node-api value
    kind: str
    group: str
    version: str
    plural: str
    succeeded: str  # the condition type that means success
    install: str  # what a cluster without it needs
    build: Callable[..., dict[str, Any]]
    validate: Callable[[dict[str, Any]], None]

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"

    def describe(self, namespace: str, name: str) -> str:
        """The kubectl commands that show the job and its logs."""
        if self.key == "trainjob":  # the JobSet has the TrainJob's name and labels its pods
            logs = (f"kubectl -n {namespace} logs -l jobset.sigs.k8s.io/jobset-name={name} "
                    "--prefix --tail=200")  # fmt: skip
        else:
            logs = f"kubectl -n {namespace} logs {name}-master-0"
        return f"kubectl -n {namespace} describe {self.kind.lower()} {name}; logs: {logs}"


TRAINJOB = JobKind(
    "trainjob", trainjob.KIND, trainjob.GROUP, trainjob.VERSION, "trainjobs", "Complete",
    f"Kubeflow Trainer v2 >= 2.2 (TrainJob, trainer.kubeflow.org/v1alpha1) with the "
    f"ClusterTrainingRuntime the job names (default {trainjob.DEFAULT_RUNTIME}); {TRAINER_DOCS}",
    trainjob.build_trainjob, trainjob.validate,
)  # fmt: skip
PYTORCHJOB = JobKind(
    "pytorchjob", "PyTorchJob", "kubeflow.org", "v1", "pytorchjobs", "Succeeded",
    "the Kubeflow Training Operator v1 (PyTorchJob, kubeflow.org/v1)",
    pytorchjob.build_pytorchjob, pytorchjob.validate,
)  # fmt: skip
KINDS = {k.key: k for k in (TRAINJOB, PYTORCHJOB)}


def kind_of(manifest: dict[str, Any]) -> JobKind:
    for kind in KINDS.values():
        if (manifest.get("apiVersion"), manifest.get("kind")) == (kind.api_version, kind.kind):
            return kind
    raise ValueError(f"not a multi-node job manifest: {manifest.get('apiVersion')} "
                     f"{manifest.get('kind')}")  # fmt: skip


def served(api: Any, kind: JobKind) -> bool:
    """Whether the API server serves ``kind`` (its group/version lists the resource)."""
    from kubernetes.client.exceptions import ApiException

    try:
        resources = api.get_api_resources(kind.group, kind.version)
    except ApiException as exc:
        if exc.status == 404:  # the group/version is not installed
            return False
        raise TrainingJobError(f"API discovery of {kind.api_version} failed: HTTP {exc.status} "
                               f"{getattr(exc, 'body', '') or exc}") from exc  # fmt: skip
    return any(r.name == kind.plural for r in resources.resources or [])


def detect(api: Any, choice: str = "auto") -> JobKind:
    """The job API to use: ``choice`` if the cluster serves it; with ``auto``, TrainJob if
    served, else PyTorchJob. NoTrainerError naming what to install otherwise."""
    if choice not in CHOICES:
        raise ValueError(f"multi-node API {choice!r}: expected one of {list(CHOICES)}")
    candidates = list(KINDS.values()) if choice == "auto" else [KINDS[choice]]
    for kind in candidates:
        if served(api, kind):
            return kind
    host = getattr(getattr(api, "api_client", None), "configuration", None)
    where = f" at {host.host}" if host is not None else ""
    if choice == "auto":
        raise NoTrainerError(
            f"the Kubernetes API{where} serves neither TrainJob ({TRAINJOB.api_version}) nor "
            f"PyTorchJob ({PYTORCHJOB.api_version}), so nodes > 1 cannot run: install "
            f"{TRAINJOB.install}, or {PYTORCHJOB.install}; or run with nodes=1"
        )
    other = next(k for k in KINDS.values() if k.key != choice)
    hint = (f" (it serves {other.kind}: compile with --multi-node-api {other.key} or auto)"
            if served(api, other) else "")  # fmt: skip
    raise NoTrainerError(
        f"the pipeline was compiled with --multi-node-api {choice}, but the Kubernetes "
        f"API{where} does not serve {KINDS[choice].kind} ({KINDS[choice].api_version}){hint}: "
        f"install {KINDS[choice].install}"
    )
