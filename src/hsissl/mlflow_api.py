"""The MLflow client names hsissl uses and the bounds on its HTTP calls, shared by
:mod:`hsissl.tracking`, :mod:`hsissl.tracking_outbox` and :mod:`hsissl.registry` (so none of
them imports another for these)."""

from __future__ import annotations

import os
from functools import cache
from types import SimpleNamespace

# MLflow's defaults (7 retries, backoff factor 2, 120 s per attempt) block a stage for 4 min
# on a closed port and for over 15 min on a server that never answers. Set unless the user
# set them; MLflow reads them on every request.
HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",  # seconds per attempt (connect, then each read)
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",  # sleeps 0, 2, 4 s (+ up to 1 s jitter)
    "MLFLOW_HTTP_RESPECT_RETRY_AFTER_HEADER": "false",  # a 503's Retry-After is unbounded
}


@cache
def names() -> SimpleNamespace:
    """The MLflow names this module uses, imported on first use: only tracked runs need mlflow,
    so the library (training, benchmarks) imports and runs on machines without it."""
    try:
        from mlflow import entities, exceptions, tracking
        from mlflow.utils import mlflow_tags, validation
    except ImportError as exc:
        raise ImportError(
            f"experiment tracking (hsissl.tracking) needs the 'mlflow' package, which failed to "
            f"import ({exc}); install it with `pip install mlflow`"
        ) from exc
    return SimpleNamespace(
        Metric=entities.Metric, Param=entities.Param, RunTag=entities.RunTag,
        MlflowException=exceptions.MlflowException, MlflowClient=tracking.MlflowClient,
        MLFLOW_PARENT_RUN_ID=mlflow_tags.MLFLOW_PARENT_RUN_ID,
        MAX_METRICS_PER_BATCH=validation.MAX_METRICS_PER_BATCH,
        MAX_PARAM_VAL_LENGTH=validation.MAX_PARAM_VAL_LENGTH,
        MAX_PARAMS_TAGS_PER_BATCH=validation.MAX_PARAMS_TAGS_PER_BATCH,
    )  # fmt: skip


def apply_http_limits() -> None:
    """Bound MLflow's HTTP retries and timeouts (``HTTP_LIMITS``) where the user has not."""
    for name, value in HTTP_LIMITS.items():
        os.environ.setdefault(name, value)
