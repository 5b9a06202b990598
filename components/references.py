"""Existing store objects as artifacts (the refs components): what a rerun starts from."""

from __future__ import annotations

from typing import Any

from components.artifacts import publish
from components.runtime import setup_logging
from hsissl.layout import ENCODER, checkpoint_key, checkpoint_name, dataset_uri, storage_of
from hsissl.presets import stage_config


def reference(uri: str, artifact: Any, kind: str) -> str:
    """An existing dataset/encoder in the store as an artifact; checks that it exists. A
    registered encoder (``models:/<name>/<version>``, ``models:/<name>@<alias>``) is passed on
    as it is: finetune resolves it against its own tracking URI and checks it there."""
    if kind == "encoder" and uri.startswith("models:/"):
        from hsissl import registry

        registry.parse(uri)  # a malformed one fails here, before any GPU pod starts
    elif not uri.startswith("random:"):
        from hsissl.data.shards import MANIFEST  # a committed dataset has one
        from hsissl.storage import open_storage

        target = f"{uri.rstrip('/')}/{MANIFEST}" if kind == "dataset" else uri
        parent, _, name = target.rpartition("/")
        if not open_storage(parent).exists(name):
            raise FileNotFoundError(f"{kind} {uri}: {target} does not exist in the artifact store")
    publish(artifact, uri, {"kind": kind})
    return uri


def dataset_ref(uri: str, preset: str, overrides: list[str], storage_uri: str, dataset: Any) -> str:
    """``uri``, or the dataset the config names (``<storage>/datasets/<data.name>``)."""
    setup_logging()
    if not uri:
        uri = dataset_uri(stage_config(preset, overrides, {"storage.uri": storage_uri}))
    return reference(uri, dataset, "dataset")


def encoder_ref(uri: str, preset: str, overrides: list[str], storage_uri: str, method: str,
                source_run_id: str, encoder: Any) -> str:  # fmt: skip
    """``uri`` (an encoder record, ``random:<factory>``, or ``random`` = a random init of the
    config's MAE architecture), or the encoder that pretraining ``method`` wrote in pipeline
    run ``source_run_id``."""
    setup_logging()
    if uri == "random":  # the control: a random init of the architecture MAE pretrains
        from hsissl import methods

        cfg = stage_config(preset, overrides, {"storage.uri": storage_uri})
        uri = f"random:{cfg.mae.model or methods.get('mae').default_model}"
    if not uri:
        cfg = stage_config(preset, overrides, {"storage.uri": storage_uri})
        name = checkpoint_name(method, cfg.pretrain.name, source_run_id)
        uri = storage_of(cfg).join(checkpoint_key(name, ENCODER))
    return reference(uri, encoder, "encoder")
