"""Checkpoints: resumable training state and the encoder record every later stage loads.

An encoder record carries what is needed to use the encoder correctly anywhere: how to
build it (factory + kwargs), its weights, the Normalizer its inputs must go through, the
dataset it was trained on and the resolved config.
"""

from __future__ import annotations

import io
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hsissl.data.normalize import Normalizer, NormalizerMismatch
from hsissl.models import create_model
from hsissl.storage import Storage, open_storage

ENCODER_FORMAT = "hsissl-encoder/1"
TRAIN_FORMAT = "hsissl-train/1"


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


def load_encoder(
    uri: str, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, Normalizer, dict]:
    """(encoder in eval mode, its Normalizer, the record without weights) from an encoder URI."""
    parent, _, name = uri.rstrip("/").rpartition("/")
    record = load(open_storage(parent), name, map_location=map_location)
    if record.get("format") != ENCODER_FORMAT:
        raise CheckpointError(
            f"{uri}: format {record.get('format')!r}, expected {ENCODER_FORMAT!r}"
        )
    if "normalizer" not in record:
        raise NormalizerMismatch(
            f"{uri}: the checkpoint carries no Normalizer; refusing to guess one"
        )
    normalizer = Normalizer.from_dict(record["normalizer"], origin=uri)
    build = record.get("build")
    try:
        encoder = build_encoder(build)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # factory or kwargs unknown
        reason = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise CheckpointError(
            f"{uri}: cannot rebuild its encoder from build {build!r}: {reason}"
        ) from exc
    try:
        encoder.load_state_dict(record.pop("state_dict"))
    except (KeyError, RuntimeError) as exc:  # no weights, or weights of another architecture
        reason = "it holds no state_dict" if isinstance(exc, KeyError) else exc
        raise CheckpointError(
            f"{uri}: its weights do not fit the encoder its build makes (factory "
            f"{build['factory']!r}, kwargs {build.get('kwargs', {})}): {reason}"
        ) from exc
    return encoder.eval(), normalizer, record
