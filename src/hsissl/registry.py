"""Encoders in the MLflow Model Registry: one registered model per pretraining method
(``<tracking.model_prefix><method>``, e.g. ``hsissl-mae``), a new version per pretraining
run, and the ``models:/`` URIs finetuning accepts for ``finetune.encoder``.

A version's source is the encoder record in the artifact store
(``s3://…/checkpoints/<name>/encoder.pt``), so there is one copy, read the way any encoder
is; the version is tagged with the dataset's Normalizer fingerprint, the git SHA, the KFP run
id, the method and the training step. MLflow 3 servers (mlflow/server/handlers.py,
``_validate_source_run``) accept object-store sources but refuse a local path outside the
run's own artifact folder, so a store on local disk is only registered with a ``sqlite:``
tracking URI (no server); otherwise a warning says why it was not.

A checkpoint folder belongs to one pipeline run (``<method>-<run id>``), so a version's source
does not change afterwards; a line of runs continued under one ``pretrain.name`` rewrites its
encoder, which :func:`check_step` catches when a version is used.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

from hsissl.config import Config, ConfigError
from hsissl.tracking import KFP_RUN_ENV

log = logging.getLogger(__name__)

SCHEME = "models:/"
_NAME = r"[^/@]+"
_URI = re.compile(rf"^models:/(?P<name>{_NAME})(?:/(?P<version>\d+|latest)|@(?P<alias>[\w-]+))$")


def model_name(cfg: Config, method: str) -> str:
    """The registered model of ``method``; "" when registration is off (empty prefix)."""
    prefix = cfg.tracking.model_prefix
    return f"{prefix}{method}" if prefix else ""


def register_encoder(tracker: Any, cfg: Config, method: str, encoder_uri: str,
                     normalizer: str, step: int, dataset_uri: str) -> str | None:  # fmt: skip
    """Register ``encoder_uri`` as a new version of the method's model, linked to the
    tracker's run; returns ``models:/<name>/<version>``. Best-effort like all tracking once a
    run has started: a failure is one warning (the encoder itself is saved), never an error.
    A retried process that finished the same checkpoint at the same step reuses its version."""
    from mlflow.exceptions import MlflowException

    from hsissl.tracking import git_sha

    name = model_name(cfg, method)
    if not name:
        return None
    client = tracker.client
    tags = {"method": method, "normalizer": normalizer, "step": str(step),
            "dataset": dataset_uri, "git_sha": git_sha() or "",
            "kfp_run_id": os.environ.get(KFP_RUN_ENV, "")}  # fmt: skip
    tags = {k: v for k, v in tags.items() if v}
    try:
        try:
            client.create_registered_model(
                name, tags={"hsissl_role": "encoder", "method": method},
                description=f"hsissl {method} encoders: one version per pretraining run; use "
                            f"finetune.encoder=models:/{name}/<version> or models:/{name}@<alias>",
            )  # fmt: skip
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        escaped = encoder_uri.replace("'", "\\'")
        for version in client.search_model_versions(
            f"name = '{name}' and source_path = '{escaped}'"
        ):
            if version.tags.get("step") == str(step):
                uri = f"{SCHEME}{name}/{version.version}"
                log.info("encoder %s already registered as %s", encoder_uri, uri)
                return uri
        version = client.create_model_version(name, encoder_uri, run_id=tracker.run_id,
                                              tags=tags)  # fmt: skip
    except Exception as exc:  # tracking must not cost a finished pretraining
        hint = ""
        if "://" not in encoder_uri or encoder_uri.startswith("file:"):
            hint = (" (an MLflow server only registers encoders in an object store: set "
                    "storage.uri=s3://…, or track to sqlite:///…)")  # fmt: skip
        log.warning("encoder %s not registered as model %s at %s: %s%s", encoder_uri, name,
                    tracker.uri, exc, hint)  # fmt: skip
        return None
    uri = f"{SCHEME}{name}/{version.version}"
    tracker.set_tags({"registered_model": uri})
    log.info("encoder %s registered as %s", encoder_uri, uri)
    return uri


def parse(uri: str) -> tuple[str, str | None, str | None]:
    """(name, version or "latest" or None, alias or None) of a ``models:/`` URI."""
    match = _URI.match(uri)
    if not match:
        raise ConfigError(
            f"finetune.encoder={uri!r}: expected models:/<name>/<version>, "
            "models:/<name>/latest or models:/<name>@<alias>"
        )
    return match["name"], match["version"], match["alias"]


def resolve(uri: str, tracking_uri: str) -> dict[str, Any]:
    """The registered version a ``models:/`` URI names: ``source`` (the encoder record's
    store URI), ``name``, ``version``, ``step``, ``normalizer``, ``uri`` (with the version
    number). ConfigError naming the URI, the tracking server and what it does have."""
    from mlflow.tracking import MlflowClient

    from hsissl.mlflow_api import apply_http_limits

    name, version, alias = parse(uri)
    apply_http_limits()
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    where = f"finetune.encoder={uri!r} (registry at {tracking_uri})"
    try:
        if alias:
            found = client.get_model_version_by_alias(name, alias)
        elif version == "latest":
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise ConfigError(f"{where}: model {name!r} has no versions")
            found = max(versions, key=lambda v: int(v.version))
        else:
            found = client.get_model_version(name, version)
    except ConfigError:
        raise
    except Exception as exc:  # MlflowException, also for an unreachable server
        known = _known(client, name)
        if known is None:
            raise ConfigError(f"{where}: the registry could not be read ({exc}); check "
                              "tracking.uri / $MLFLOW_TRACKING_URI") from exc  # fmt: skip
        raise ConfigError(f"{where}: {getattr(exc, 'message', exc)}; {known}") from exc
    return {"source": found.source, "name": name, "version": str(found.version),
            "uri": f"{SCHEME}{name}/{found.version}", "step": found.tags.get("step"),
            "normalizer": found.tags.get("normalizer")}  # fmt: skip


def _known(client: Any, name: str) -> str | None:
    """What the registry has, for an error message; None if it cannot be read at all."""
    try:
        model = client.get_registered_model(name)
    except Exception:
        try:
            names = sorted(m.name for m in client.search_registered_models(max_results=50))
        except Exception:
            return None
        return f"registered models: {names or 'none'}"
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    aliases = sorted(getattr(model, "aliases", {}) or {})
    return f"{name} has versions {versions or 'none'} and aliases {aliases or 'none'}"


def check_step(registered: dict[str, Any], record_step: int | None) -> None:
    """Refuse an encoder record that is not the one registered (rewritten since, e.g. by a
    later run continuing the same ``pretrain.name``)."""
    if registered.get("step") is not None and str(record_step) != registered["step"]:
        raise ConfigError(
            f"finetune.encoder={registered['uri']!r}: {registered['source']} is now at step "
            f"{record_step}, but version {registered['version']} was registered at step "
            f"{registered['step']}: the checkpoint was rewritten by a later pretraining with the "
            "same pretrain.name; pick the version registered by that run"
        )
