"""KFP artifacts as pointers: their metadata (and a small JSON file at ``artifact.path``) hold
the object-store URI of the real data, which stays in the artifact store; metrics and the
confusion matrix as the KFP UI shows them. Never imports kfp."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hsissl.layout import METRICS

POINTER_FILE_LIMIT = 4096  # a pointer file larger than this is not a pointer


def uri_of(artifact: Any) -> str:
    """The object-store URI an input artifact points to (metadata, else its pointer file)."""
    uri = (artifact.metadata or {}).get("uri")
    path = Path(artifact.path) if getattr(artifact, "path", None) else None
    if not uri and path is not None and path.is_file() and path.stat().st_size < POINTER_FILE_LIMIT:
        uri = json.loads(path.read_text()).get("uri")
    if not uri:
        raise ValueError(
            f"input artifact {artifact.name!r} ({artifact.uri}) points nowhere: expected "
            "metadata['uri'] or a JSON pointer file with a 'uri' key"
        )
    return uri


def scalars(values: dict[str, Any], prefix: str = "") -> dict[str, float | str]:
    """Flat ``{"a.b": 1.0}`` of the numbers and short strings in ``values`` (for metadata)."""
    out: dict[str, float | str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(scalars(value, prefix=f"{name}."))
        elif isinstance(value, bool):
            out[name] = str(value).lower()
        elif isinstance(value, int | float):
            out[name] = float(value)
        elif isinstance(value, str) and len(value) <= 500:
            out[name] = value
    return out


def publish(artifact: Any, uri: str, summary: dict[str, Any] | None = None) -> None:
    """Make ``artifact`` point at ``uri`` (metadata + a small JSON pointer file)."""
    info = {"uri": uri, **scalars(summary or {})}
    artifact.metadata.update(info)
    path = Path(artifact.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=1))


def log_metrics(metrics: Any, values: dict[str, Any]) -> None:
    """Numeric entries of ``values`` (flattened) on a KFP Metrics artifact, also as a JSON file
    at its path (a Metrics artifact without a file counts as missing in kfp.local's cache)."""
    for key, value in scalars(values).items():
        if isinstance(value, float):
            metrics.log_metric(key, value)
    path = Path(metrics.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(metrics.metadata), indent=1))


def log_confusion(confusion: Any, results_uri: str) -> None:
    """The whole-scene confusion matrix of a finetune or baseline result (its
    ``metrics.json``) on a KFP ``ClassificationMetrics`` artifact, which the run page draws:
    the WHU-OHS classes by name, rows = ground truth, columns = prediction, in pixels. The
    ``unlabelled`` id 0 is left out (its pixels are not scored)."""
    from hsissl.data.ohs import CLASS_NAMES

    metrics = json.loads(fetch(f"{results_uri.rstrip('/')}/{METRICS}"))
    matrix = metrics["scene"]["matrix"]
    ids = range(1, len(matrix))
    names = [CLASS_NAMES[i] if i < len(CLASS_NAMES) else f"class {i}" for i in ids]
    confusion.log_confusion_matrix(names, [[int(matrix[t][p]) for p in ids] for t in ids])
    path = Path(confusion.path)  # a file, as for Metrics (kfp.local's cache wants one)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(confusion.metadata)))


def fetch(uri: str) -> bytes:
    """Bytes of the object at ``uri`` (file path, file:// or s3://)."""
    from hsissl.storage import open_storage

    parent, _, name = uri.rstrip("/").rpartition("/")
    return open_storage(parent).get_bytes(name)
