"""The KFP backend versions the compiled pipeline needs, and the check against a live server.

Every construct the compiled YAML uses, with the first kubeflow/pipelines release whose backend
accepts it (read in that repository's tags 2.0.0-2.17.0; there are no 2.6-2.13 releases). The
floor is the newest of them: 2.15.0, for ``optional`` on Secret/ConfigMap env entries. A
2.14 API server refuses such a run at creation: its Argo compiler
(``backend/src/v2/compiler/argocompiler/container.go``) parses each task's Kubernetes config
with a strict ``protojson.Unmarshal`` (unknown field). ``tests/test_backend_compat.py``
compiles the pipelines, finds every construct in them and fails on one missing from this table
or newer than the floor; docs/deploy.md shows the same table.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

log = logging.getLogger(__name__)

MIN_BACKEND = (2, 15, 0)
PROTO = "kubernetes_platform/proto/kubernetes_executor_config.proto"

# construct (path in the compiled YAML) -> (first backend release, evidence)
PLATFORM_CONSTRUCTS: dict[str, tuple[tuple[int, int, int], str]] = {
    "secretAsEnv": ((2, 0, 0), f"{PROTO}: SecretAsEnv"),
    "secretAsEnv.optional": ((2, 15, 0), f"{PROTO}: SecretAsEnv.optional = 3"),
    "secretAsEnv.secretNameParameter": ((2, 5, 0), f"{PROTO}: secret_name_parameter = 4"),
    "configMapAsEnv": ((2, 1, 0), f"{PROTO}: ConfigMapAsEnv"),
    "configMapAsEnv.optional": ((2, 15, 0), f"{PROTO}: ConfigMapAsEnv.optional = 4"),
    "configMapAsEnv.configMapNameParameter": ((2, 5, 0), f"{PROTO}: config_map_name_parameter"),
    "configMapAsVolume": ((2, 1, 0), f"{PROTO}: ConfigMapAsVolume config_map_as_volume = 8"),
    "configMapAsVolume.optional": ((2, 1, 0), f"{PROTO}: ConfigMapAsVolume.optional = 3"),
    "configMapAsVolume.configMapNameParameter": ((2, 5, 0), f"{PROTO}: config_map_name_parameter"),
    "fieldPathAsEnv": ((2, 1, 0), f"{PROTO}: FieldPathAsEnv field_path_as_env = 11"),
    "podMetadata": ((2, 1, 0), f"{PROTO}: PodMetadata pod_metadata = 5"),
    "nodeSelector": ((2, 0, 0), f"{PROTO}: NodeSelector node_selector = 4"),
    "nodeSelector.nodeSelectorJson": ((2, 5, 0), f"{PROTO}: NodeSelector.node_selector_json = 2"),
    "tolerations": ((2, 1, 0), f"{PROTO}: Toleration tolerations = 12"),
    "tolerations.tolerationJson": ((2, 5, 0), f"{PROTO}: Toleration.toleration_json = 6"),
    "emptyDirMounts": ((2, 3, 0), f"{PROTO}: EmptyDirMount empty_dir_mounts = 17"),
    "pvcMount": ((2, 0, 0), f"{PROTO}: PvcMount pvc_mount = 3"),
    "pvcMount.pvcNameParameter": ((2, 5, 0), f"{PROTO}: PvcMount.pvc_name_parameter = 5"),
    "pvcMount.componentInputParameter": (
        (2, 0, 0),
        f"{PROTO}: PvcMount.component_input_parameter (deprecated form kfp-kubernetes also writes)",
    ),
    "imagePullSecret": ((2, 1, 0), f"{PROTO}: ImagePullSecret image_pull_secret = 6"),
    "imagePullSecret.secretNameParameter": ((2, 5, 0), f"{PROTO}: secret_name_parameter"),
}
SPEC_CONSTRUCTS: dict[str, tuple[tuple[int, int, int], str]] = {
    "taskFinalStatus": (
        (2, 14, 0),
        "backend/src/v2/driver/resolve.go: TaskFinalStatus case "
        "(PipelineTaskFinalStatus of the exit task)",
    ),
    "retryPolicy": (
        (2, 4, 1),
        "backend/src/v2/compiler/argocompiler/container.go: GetRetryPolicy / GetBackoffDuration",
    ),
    "resourceCpuRequest": ((2, 4, 0), "backend/src/v2/driver/driver.go: GetResourceCpuRequest"),
    "resourceMemoryRequest": ((2, 4, 0), "backend/src/v2/driver/driver.go: resource strings"),
    "resourceMemoryLimit": ((2, 4, 0), "backend/src/v2/driver/driver.go: resource strings"),
    "accelerator.resourceType": (
        (2, 4, 0),
        "backend/src/v2/driver/driver.go: GetResourceCount "
        "(accelerator type/count as run parameters)",
    ),
}


def version_text(version: tuple[int, ...]) -> str:
    return ".".join(str(v) for v in version)


def constructs_in(docs: list[dict[str, Any]]) -> set[str]:
    """The constructs of a compiled pipeline (``docs``: its YAML documents, the pipeline spec
    then the platform spec): the spec keys of SPEC_CONSTRUCTS it contains, every field of its
    tasks' Kubernetes configs, and their sub-fields that came with later releases (those in
    the table, ``optional``, ``*Parameter``, ``*Json``)."""
    text = json.dumps(docs[0])
    found = {key for key in SPEC_CONSTRUCTS if f'"{key.rsplit(".", 1)[-1]}"' in text}
    for platform in docs[1:]:
        deployment = platform.get("platforms", {}).get("kubernetes", {}).get("deploymentSpec", {})
        for config in deployment.get("executors", {}).values():
            for key, value in config.items():
                found.add(key)
                for item in value if isinstance(value, list) else [value]:
                    for sub in item if isinstance(item, dict) else {}:
                        path = f"{key}.{sub}"
                        if (
                            path in PLATFORM_CONSTRUCTS
                            or sub == "optional"
                            or sub.endswith(("Parameter", "Json"))
                        ):
                            found.add(path)
    return found


def minimum_backend(constructs: set[str]) -> tuple[int, int, int]:
    table = {**PLATFORM_CONSTRUCTS, **SPEC_CONSTRUCTS}
    unknown = sorted(c for c in constructs if c not in table)
    if unknown:
        raise KeyError(f"constructs without a known minimum backend version: {unknown}; add "
                       f"them to pipelines/backend.py with the evidence")  # fmt: skip
    return max((table[c][0] for c in constructs), default=(2, 0, 0))


def parse_version(text: str) -> tuple[int, int, int] | None:
    """``2.15.0``, ``v2.15.1``, ``2.16.0-rc.1`` -> (2, 15, 0); None for ``unknown`` or junk."""
    match = re.match(r"^v?(\d+)\.(\d+)(?:\.(\d+))?", (text or "").strip())
    if not match:
        return None
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


class BackendVersionError(ValueError):
    """The KFP server is older than the pipeline needs."""


def server_version(client: Any) -> str | None:
    """The ``tag_name`` the KFP API server reports at ``/apis/v2beta1/healthz`` (the SDK's
    model drops that field, so the JSON is read raw), or None when it reports none."""
    api_client = client._healthz_api.api_client  # the client's auth headers and host
    try:
        response = api_client.call_api("/apis/v2beta1/healthz", "GET", auth_settings=["Bearer"],
                                       _preload_content=False, _return_http_data_only=True)  # fmt: skip
        body = json.loads(response.data or b"{}")
    except Exception as exc:  # an old or proxied server: no version to check against
        log.warning("could not read the KFP server's version (%s); not checked", exc)
        return None
    tag = str(body.get("tag_name") or "")
    return tag if parse_version(tag) else None


def check_server(client: Any, needed: tuple[int, int, int] = MIN_BACKEND) -> str | None:
    """Raise BackendVersionError when the server reports a version below ``needed``; returns
    the reported version (None: the server reports none, e.g. ``unknown``: a warning)."""
    tag = server_version(client)
    if tag is None:
        log.warning("the KFP server reports no version; this pipeline needs KFP backend >= %s",
                    version_text(needed))  # fmt: skip
        return None
    version = parse_version(tag)
    if version is not None and version < needed:
        raise BackendVersionError(
            f"the KFP server at {client._healthz_api.api_client.configuration.host} is version "
            f"{tag}; this pipeline needs KFP backend >= {version_text(needed)} (optional Secret/"
            "ConfigMap env entries; see docs/deploy.md, 'Compatibility'); upgrade Kubeflow "
            "Pipelines, or pass --skip-version-check to try anyway"
        )
    return tag
