"""A stage's config from a pipeline's parameters: preset <- ``overrides`` <- the wiring.

The wiring (dataset and encoder URIs, storage, tracking, source, epochs) is what the pipeline
owns, so it always wins. A preset is a file path, a name looked up in :func:`config_dirs`
(``tiny`` -> ``configs/tiny.yaml``), or "" for the defaults.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hsissl.config import Config, ConfigError, load_config
from hsissl.layout import split_dataset_uri

CONFIG_DIR_ENV = "HSISSL_CONFIG_DIR"


def config_dirs() -> list[Path]:
    """Where a preset given by name (``tiny``) is looked up, in order."""
    dirs = [Path(os.environ[CONFIG_DIR_ENV])] if os.environ.get(CONFIG_DIR_ENV) else []
    return [
        *dirs,
        Path.cwd() / "configs",
        Path("/app/configs"),
        Path(__file__).parents[2] / "configs",  # the repository's, beside src/
    ]


def resolve_preset(preset: str) -> Path | None:
    """A preset path (``/etc/hsissl/config.yaml``), a name (``tiny``), or "" for the defaults."""
    if not preset:
        return None
    path = Path(preset).expanduser()
    if path.is_file():
        return path
    if path.suffix not in (".yaml", ".yml") and "/" not in preset:
        for folder in config_dirs():
            if (folder / f"{preset}.yaml").is_file():
                return folder / f"{preset}.yaml"
    raise ConfigError(
        f"config preset {preset!r}: no such file, and no {preset}.yaml in "
        f"{', '.join(str(d) for d in config_dirs())}"
    )


def override(key: str, value: Any) -> str:
    """``key=value`` with the value JSON-encoded (valid YAML), so URIs and paths parse as given."""
    return f"{key}={json.dumps(value)}"


def managed_overrides(wiring: dict[str, Any]) -> list[str]:
    """``wiring`` as ``key=value`` overrides; entries whose value is None or "" are left out."""
    return [override(k, v) for k, v in wiring.items() if v not in (None, "")]


def stage_config(preset: str, overrides: list[str], wiring: dict[str, Any] | None = None) -> Config:
    """The stage's Config; ``wiring`` entries whose value is None or "" are left out."""
    return load_config(resolve_preset(preset), [*overrides, *managed_overrides(wiring or {})])


def dataset_wiring(dataset_uri: str) -> dict[str, str]:
    """``<root>/datasets/<name>`` -> storage root and dataset name, so a stage reads exactly it."""
    root, name = split_dataset_uri(dataset_uri)
    return {"storage.uri": root, "data.name": name}
