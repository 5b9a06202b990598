"""Talk to a Kubeflow Pipelines host: submit a run, upload a pipeline version, rerun a stage.

Authentication: ``--token`` or $KFP_TOKEN (a bearer token), else whatever ``kfp.Client``
finds (kube config, in-cluster service account). Runs use the chart's service account.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import kfp

from components.options import PipelineOptions
from pipelines.backend import check_server
from pipelines.compile import compile_pipeline
from pipelines.dag import PIPELINE_NAME

SERVICE_ACCOUNT = "hsissl-pipeline"  # created by charts/hsissl for release "hsissl"
# Parameters a one-stage rerun takes over from the earlier run (the rest are the stage's own).
INHERITED = ("source", "preset", "overrides", "storage_uri", "tracking_uri", "pretrain_epochs",
             "pretrain_max_steps", "gpus", "gpu_type", "nodes", "gpu_node_selector",
             "gpu_tolerations", "data_pvc")  # fmt: skip


def connect(host: str, namespace: str | None = None, token: str | None = None) -> kfp.Client:
    token = token or os.environ.get("KFP_TOKEN") or None
    with warnings.catch_warnings():  # "only works with KFP v2.0.0-beta.2 and later": so do we
        warnings.simplefilter("ignore", FutureWarning)
        return kfp.Client(host=host, namespace=namespace or "kubeflow", existing_token=token)


def _package(opts: PipelineOptions | None, stage: str | None, package: str | Path | None) -> Path:
    if package:
        return Path(package)
    folder = Path(tempfile.mkdtemp(prefix="hsissl-pipeline-"))
    return compile_pipeline(
        folder / f"{PIPELINE_NAME}{'-' + stage if stage else ''}.yaml", opts, stage
    )


def submit(client: kfp.Client, arguments: dict[str, Any], *, experiment: str = PIPELINE_NAME,
           run_name: str | None = None, opts: PipelineOptions | None = None,
           stage: str | None = None, package: str | Path | None = None,
           service_account: str | None = SERVICE_ACCOUNT,
           check_version: bool = True) -> str:  # fmt: skip
    """Create a run of the DAG (or of ``stage`` alone) with ``arguments``; returns its run id.
    First the server's version is checked against ``pipelines.backend.MIN_BACKEND``."""
    if check_version:
        check_server(client)
    result = client.create_run_from_pipeline_package(
        str(_package(opts, stage, package)), arguments=arguments, run_name=run_name,
        experiment_name=experiment, service_account=service_account,
    )  # fmt: skip
    return result.run_id


def upload(client: kfp.Client, version: str, *, pipeline: str = PIPELINE_NAME,
           opts: PipelineOptions | None = None, package: str | Path | None = None,
           check_version: bool = True, skip_existing: bool = False) -> str:  # fmt: skip
    """Upload the compiled DAG as version ``version`` (e.g. the git SHA) of ``pipeline``,
    creating the pipeline on first upload (after the server's version check); returns the
    pipeline id. KFP rejects a second version of the same name: ``skip_existing`` leaves an
    existing one alone instead (CI re-runs)."""
    if check_version:
        check_server(client)
    pipeline_id = client.get_pipeline_id(pipeline)
    if pipeline_id is not None and skip_existing and version_exists(client, pipeline_id, version):
        print(f"pipeline {pipeline!r} has a version {version!r} already; not uploaded again")
        return pipeline_id
    path = str(_package(opts, None, package))
    if pipeline_id is None:  # its first version is named after the pipeline; add ours too
        pipeline_id = client.upload_pipeline(path, pipeline_name=pipeline).pipeline_id
    client.upload_pipeline_version(path, pipeline_version_name=version, pipeline_id=pipeline_id)
    return pipeline_id


def version_exists(client: kfp.Client, pipeline_id: str, version: str) -> bool:
    """Whether ``pipeline_id`` has a version named ``version``. KFP keeps version names unique
    per pipeline (unique index on PipelineId, Name) and filters them by the API key ``name``
    (backend/src/apiserver/model/pipeline_version.go, APIToModelFieldMap, KFP 2.x)."""
    name_filter = json.dumps({"predicates": [
        {"operation": "EQUALS", "key": "name", "stringValue": version}]})  # fmt: skip
    listed = client.list_pipeline_versions(pipeline_id, page_size=1, filter=name_filter)
    return bool(listed.pipeline_versions)


def rerun_arguments(earlier: dict[str, Any], run_id: str, stage: str, overrides: list[str],
                    encoder: str = "mae", head: str = "") -> dict[str, Any]:  # fmt: skip
    """Arguments of the one-stage pipeline from the earlier run's parameters: its dataset and
    (finetune-heads) its ``encoder`` are referenced, not recomputed."""
    args = {k: earlier[k] for k in INHERITED if k in earlier}
    args["overrides"] = [*earlier.get("overrides", []), *overrides]
    if stage == "finetune-heads":
        args |= {"source_run_id": run_id, "encoder_method": encoder, "head": head}
        if encoder == "random":
            args["encoder_uri"] = earlier.get("control_encoder") or "random"
    return args


def rerun(client: kfp.Client, run_id: str, stage: str, overrides: list[str], *,
          encoder: str = "mae", head: str = "", experiment: str = PIPELINE_NAME,
          opts: PipelineOptions | None = None,
          service_account: str | None = SERVICE_ACCOUNT, check_version: bool = True) -> str:  # fmt: skip
    """Submit ``stage`` alone on the artifacts of KFP run ``run_id``; returns the new run id."""
    run = client.get_run(run_id)
    earlier = dict(run.runtime_config.parameters or {}) if run.runtime_config else {}
    args = rerun_arguments(earlier, run_id, stage, overrides, encoder, head)
    return submit(client, args, experiment=experiment, run_name=f"rerun {stage} of {run_id}",
                  opts=opts, stage=stage, service_account=service_account,
                  check_version=check_version)  # fmt: skip
