"""The ingest task's work in its pod: the source checked, the dataset ingested and published."""

from __future__ import annotations

import os
from typing import Any

from components.artifacts import publish
from components.runtime import call_stage, setup_logging
from hsissl.presets import stage_config
from hsissl.stages.results import IngestResult

# Set by the KFP backend in every step's executor container (argocompiler/common.go commonEnvs,
# 2.14-2.17), never by kfp.local: tells a cluster step from a local run.
KFP_POD_ENV = "KFP_POD_NAME"

EMPTY_SOURCE_ON_CLUSTER = (
    "source is empty: on a cluster, name the data: source=s3://<bucket>/<prefix> (WHU-OHS "
    "uploaded to the object store, e.g. s3://hsissl/WHU-OHS), a folder in the pod mounted with "
    "--data-pvc (source=/data/WHU-OHS), or source=generated for the small generated dataset"
)


def check_source(source: str) -> None:
    """In a KFP backend step an empty ``source`` is a mistake (a UI run with the default), not
    a request for the generated dataset: that one is asked for by name. Under kfp.local (also
    in a notebook pod) "" stays the generated dataset, as ``make run`` uses it."""
    if not source.strip() and os.environ.get(KFP_POD_ENV):
        raise ValueError(EMPTY_SOURCE_ON_CLUSTER)


def check_claim(data_pvc: str, mounted: bool) -> None:
    """A ``data_pvc`` run parameter on a pipeline compiled without ``--data-pvc`` mounts
    nothing: say so instead of failing later on a missing folder."""
    if data_pvc and not mounted:
        raise ValueError(
            f"data_pvc={data_pvc!r}, but this pipeline was compiled without --data-pvc, so no "
            "claim is mounted; compile (or upload) with --data-pvc <any claim> to choose the "
            "claim per run, or put the data in the object store and pass source=s3://<bucket>/"
            "<prefix>"
        )


def ingest(source: str, preset: str, overrides: list[str], storage_uri: str, tracking_uri: str,
           dataset: Any) -> IngestResult:  # fmt: skip
    setup_logging()
    check_source(source)
    cfg = stage_config(preset, overrides, {"data.source": source, "storage.uri": storage_uri,
                                           "tracking.uri": tracking_uri})  # fmt: skip
    result = call_stage("ingest", cfg)
    manifest = result.manifest
    publish(dataset, result.uri, {
        "fingerprint": manifest["fingerprint"], "created": manifest["created"],
        "normalizer": manifest["normalizer"]["fingerprint"], "reused": result.reused,
        "tiles": {split: info["tiles"] for split, info in manifest["splits"].items()},
    })  # fmt: skip
    return result
