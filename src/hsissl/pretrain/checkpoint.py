"""Checkpoints: resumable training state and the encoder record every later stage loads.

An encoder record carries what is needed to use the encoder correctly anywhere: how to
build it (factory + kwargs), its weights, the Normalizer its inputs must go through, the
dataset it was trained on and the resolved config.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import pickle
import tempfile
import typing
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hsissl.config import Config, config_class, config_from_tree
from hsissl.data.normalize import Normalizer, NormalizerMismatch
from hsissl.models import create_model
from hsissl.storage import Storage, open_storage

log = logging.getLogger(__name__)

ENCODER_FORMAT = "hsissl-encoder/1"
TRAIN_FORMAT = "hsissl-train/1"
TRAIN_STATE = "train.pt"  # the resumable training state, beside the encoder record
WHOLE_PREFIX = "model."  # the whole network's weights in the recipe's state (MAERecipe.model)


class CheckpointError(ValueError):
    """A file given as a checkpoint or encoder record that is not one (or not the right one)."""


def save(storage: Storage, key: str, payload: dict[str, Any]) -> str:
    """torch.save to the store, atomically (a reader never sees half a file)."""
    fd, tmp = tempfile.mkstemp(suffix=".pt")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        storage.put_file(Path(tmp), key)
    finally:
        os.unlink(tmp)
    return storage.join(key)


# What torch.load raises on a file it did not write (text, another pickle, a truncated or foreign
# zip) or on a pickle naming classes this code does not have.
_UNREADABLE = (
    pickle.UnpicklingError,
    EOFError,
    RuntimeError,
    ValueError,
    AttributeError,
    ImportError,
)


def load(storage: Storage, key: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The dict saved by :func:`save` at ``key``; FileNotFoundError naming the URI when it is
    missing, CheckpointError naming it when the file is not such a dict."""
    data = storage.get_bytes(key)
    try:
        payload = torch.load(io.BytesIO(data), map_location=map_location, weights_only=False)
    except _UNREADABLE as exc:
        raise CheckpointError(
            f"{storage.join(key)}: not a checkpoint written by hsissl ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(payload, dict):
        raise CheckpointError(
            f"{storage.join(key)}: not a checkpoint written by hsissl "
            f"(holds a {type(payload).__name__}, expected a dict)"
        )
    return payload


def encoder_record(encoder: nn.Module, build: dict[str, Any], normalizer: Normalizer, method: str,
                   dataset: dict[str, str], config: dict[str, Any], step: int) -> dict[str, Any]:  # fmt: skip
    return {
        "format": ENCODER_FORMAT,
        "method": method,
        "build": build,  # {"factory": name in hsissl.models.MODELS, "kwargs": {...}, "attr": "encoder" | None}
        "state_dict": {k: v.detach().cpu() for k, v in encoder.state_dict().items()},
        "normalizer": normalizer.to_dict(),
        "dataset": dataset,  # {"uri": ..., "fingerprint": normalizer fingerprint of the dataset}
        "config": config,
        "step": step,
    }


def build_encoder(build: dict[str, Any]) -> nn.Module:
    """The (untrained) encoder that ``build`` describes (see :func:`encoder_record`)."""
    model = create_model(build["factory"], **build.get("kwargs", {}))
    return getattr(model, build["attr"]) if build.get("attr") else model


def load_model(
    uri: str, map_location: str | torch.device = "cpu", whole: bool = False
) -> tuple[nn.Module, Normalizer, dict[str, Any]]:
    """(model in eval mode, its Normalizer, the checkpoint without weights) from an encoder URI.

    The model is built from the record's ``build`` (factory + kwargs, the model's config dict),
    no config file involved; a record without one (written before it existed) is rebuilt
    from the config it saved, as its method's recipe would build it. ``whole=False``: the
    encoder and the record. ``whole=True``: the whole network the run trained (the MAE with
    its pixel decoder) with the weights of the training state ``train.pt`` beside the record,
    and that state (step, config, normalizer, and the ``build`` the network was made from; no
    weights, optimiser or RNG state).
    """
    parent, _, name = uri.rstrip("/").rpartition("/")
    store = open_storage(parent)
    record = load(store, name, map_location=map_location)
    if record.get("format") != ENCODER_FORMAT:
        raise CheckpointError(
            f"{uri}: format {record.get('format')!r}, expected {ENCODER_FORMAT!r}"
        )
    if "normalizer" not in record:
        raise NormalizerMismatch(
            f"{uri}: the checkpoint carries no Normalizer; refusing to guess one"
        )
    build = record.get("build") or legacy_build(record)
    if not whole:
        normalizer = Normalizer.from_dict(record["normalizer"], origin=uri)
        return _built(uri, build, record.pop("state_dict", None)), normalizer, record
    if not store.exists(TRAIN_STATE):
        raise FileNotFoundError(f"{store.join(TRAIN_STATE)}: no training state beside {uri}; "
                                "the whole network (e.g. the MAE decoder) lives there")  # fmt: skip
    state = load(store, TRAIN_STATE, map_location=map_location)
    weights = {k.removeprefix(WHOLE_PREFIX): v for k, v in state.pop("recipe", {}).items()
               if k.startswith(WHOLE_PREFIX)}  # fmt: skip
    for key in ("optimizer", "loader", "rng"):
        state.pop(key, None)
    normalizer = Normalizer.from_dict(state["normalizer"], origin=store.join(TRAIN_STATE))
    state["build"] = {**build, "attr": None}
    return _built(uri, state["build"], weights or None), normalizer, state


def _built(uri: str, build: dict[str, Any], weights: dict[str, Any] | None) -> nn.Module:
    """The model ``build`` describes, with ``weights``, in eval mode; errors name ``uri``."""
    try:
        model = build_encoder(build)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # factory or kwargs unknown
        reason = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise CheckpointError(
            f"{uri}: cannot rebuild its encoder from build {build!r}: {reason}"
        ) from exc
    try:
        if weights is None:
            raise KeyError("state_dict")
        model.load_state_dict(weights)
    except (KeyError, RuntimeError) as exc:  # no weights, or weights of another architecture
        reason = "it holds no state_dict" if isinstance(exc, KeyError) else exc
        raise CheckpointError(
            f"{uri}: its weights do not fit the encoder its build makes (factory "
            f"{build['factory']!r}, kwargs {build.get('kwargs', {})}): {reason}"
        ) from exc
    return model.eval()


def legacy_build(record: dict[str, Any]) -> dict[str, Any]:
    """The ``build`` of a record written without one: what its method's recipe builds from
    the config the record saved."""
    from hsissl.pretrain.dinov2 import DINOv2Recipe
    from hsissl.pretrain.mae import MAERecipe
    from hsissl.pretrain.ssvit import SSViTRecipe

    recipes = {r.method: r for r in (MAERecipe, DINOv2Recipe, SSViTRecipe)}
    method = record.get("method")
    if method not in recipes or "config" not in record:
        raise CheckpointError(f"record of method {method!r} has no build and no config to "
                              "rebuild its model from")  # fmt: skip
    return recipes[method](config_from_dict(record["config"])).build()


# -- configs saved by earlier runs ---------------------------------------------------------------
def config_from_dict(tree: dict[str, Any]) -> Config:
    """A :class:`Config` from ``asdict(Config)`` as saved in a checkpoint's ``"config"``.

    Types are checked as for a preset (:func:`config_from_tree`). Keys this version no longer
    knows are dropped with a warning; keys it added since take their defaults. Only for
    records written before they held their ``build``.
    """
    known, dropped = _known_keys(tree, config_class(), "")  # with registered methods' sections
    if dropped:
        log.warning("saved config: ignoring keys unknown to this version: %s", dropped)
    return config_from_tree(known, "the checkpoint's saved config")


def _known_keys(tree: dict[str, Any], cls: type, prefix: str) -> tuple[dict[str, Any], list[str]]:
    """``tree`` without the keys ``cls`` lacks (recursing into sections), and those keys."""
    hints = typing.get_type_hints(cls)
    known: dict[str, Any] = {}
    dropped: list[str] = []
    for key, value in tree.items():
        if key not in hints:
            dropped.append(f"{prefix}{key}")
        elif dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            known[key], more = _known_keys(value, hints[key], f"{prefix}{key}.")
            dropped += more
        else:
            known[key] = value
    return known, dropped
