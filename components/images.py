"""Image references of the stages, from the one registry/tag setting in ``pipelines/images.env``.

``images.env`` is also read by the Makefile and CI (shell ``KEY=VALUE`` lines), so that what is
compiled, built and pushed never disagree. ``$HSISSL_IMAGE_REGISTRY`` / ``$HSISSL_IMAGE_TAG``
override it (the compile flags ``--image-registry`` / ``--image-tag`` default to them).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

SETTING = Path(__file__).resolve().parents[1] / "pipelines" / "images.env"  # beside the DAG
KINDS = ("cpu", "train")  # images/<kind>.Dockerfile -> <registry>/hsissl-<kind>
# A Docker reference: lowercase repository path, then :tag and/or @sha256:digest.
_REFERENCE = re.compile(
    r"^[a-z0-9][a-z0-9._/:-]*[a-z0-9](:[\w][\w.-]{0,127})?(@sha256:[0-9a-f]{64})?$"
)
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")


def read_setting(path: Path = SETTING) -> dict[str, str]:
    """``KEY=VALUE`` lines of ``path`` (comments and blank lines skipped)."""
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not re.fullmatch(r"[A-Z_]+", key):
            raise ValueError(f"{path}:{number}: expected KEY=VALUE, got {line!r}")
        values[key] = value
    missing = {"IMAGE_REGISTRY", "IMAGE_TAG"} - set(values)
    if missing:
        raise ValueError(f"{path}: missing {sorted(missing)}")
    return values


def default_registry() -> str:
    return os.environ.get("HSISSL_IMAGE_REGISTRY") or read_setting()["IMAGE_REGISTRY"]


def default_tag() -> str:
    return os.environ.get("HSISSL_IMAGE_TAG") or read_setting()["IMAGE_TAG"]


def image_name(kind: str, registry: str | None = None) -> str:
    """``<registry>/hsissl-<kind>`` (no tag)."""
    if kind not in KINDS:
        raise ValueError(f"image kind {kind!r}: expected one of {KINDS}")
    return f"{(registry or default_registry()).rstrip('/')}/hsissl-{kind}"


def image_ref(kind: str, registry: str | None = None, tag: str | None = None) -> str:
    """``<registry>/hsissl-<kind>:<tag>`` (default: the setting)."""
    tag = tag or default_tag()
    if not _TAG.match(tag):
        raise ValueError(f"image tag {tag!r}: expected [A-Za-z0-9_][A-Za-z0-9_.-]* (<= 128)")
    return check_reference(f"{image_name(kind, registry)}:{tag}")


def check_reference(ref: str) -> str:
    """``ref`` if it is a valid lowercase image reference, else ValueError naming it."""
    if not _REFERENCE.match(ref):
        raise ValueError(
            f"image {ref!r}: expected a lowercase reference REGISTRY/PATH[:TAG][@sha256:DIGEST]"
        )
    return ref
