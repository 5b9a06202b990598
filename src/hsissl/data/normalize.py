"""The Normalizer: the one object that maps stored int16 reflectance to model input.

It is computed once from the training split (saved in the dataset manifest), carried
inside every checkpoint, and checked against the dataset at evaluation time, so data can
never be normalised one way for training and another for evaluation (the failure that
left the original study at chance level: per-band statistics at training, ImageNet RGB
statistics at test).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


class NormalizerMismatch(ValueError):
    """Data or checkpoint normalised with other statistics than the ones at hand."""


@dataclass(frozen=True)
class Normalizer:
    mean: tuple[float, ...]  # per band, in stored units (reflectance x 10000)
    std: tuple[float, ...]
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(
                f"mean/std lengths differ or are empty: {len(self.mean)} vs {len(self.std)}"
            )
        if any(not np.isfinite(s) or s <= 0 for s in self.std):
            raise ValueError(f"std must be finite and positive per band, got {self.std}")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    @property
    def bands(self) -> int:
        return len(self.mean)

    @property
    def fingerprint(self) -> str:
        """Stable id of these statistics (bands + exact float64 values)."""
        data = np.asarray([self.mean, self.std], dtype="<f8").tobytes()
        return hashlib.sha256(self.bands.to_bytes(4, "little") + data).hexdigest()[:16]

    def __call__(self, x: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """(…, C, H, W) raw pixels -> float32 ``(x - mean) / std`` per band (on x's device)."""
        if x.ndim < 3 or x.shape[-3] != self.bands:
            raise NormalizerMismatch(
                f"input has shape {tuple(x.shape)}; this Normalizer expects (…, {self.bands}, H, W) "
                f"(fingerprint {self.fingerprint})"
            )
        if isinstance(x, np.ndarray):
            mean = np.asarray(self.mean, dtype=np.float32)[:, None, None]
            inv = (1.0 / np.asarray(self.std, dtype=np.float32))[:, None, None]
            return (x.astype(np.float32) - mean) * inv
        mean, inv = self._tensors(x.device)
        return (x.float() - mean) * inv

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        mean, inv = self._tensors(x.device)
        return x / inv + mean

    def check(self, fingerprint: str, what: str) -> None:
        """Refuse data described by ``what`` whose statistics fingerprint differs from ours."""
        if fingerprint != self.fingerprint:
            raise NormalizerMismatch(
                f"{what} was normalised with statistics {fingerprint}, but this model/loader uses "
                f"{self.fingerprint}; evaluate with the Normalizer saved with the model and a dataset "
                "ingested with the same statistics (mixing them gives chance-level results)"
            )

    def to_dict(self) -> dict[str, Any]:
        return {"mean": list(self.mean), "std": list(self.std), "fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: str = "normalizer") -> Normalizer:
        try:
            norm = cls(tuple(data["mean"]), tuple(data["std"]))
        except (KeyError, TypeError) as exc:
            raise NormalizerMismatch(
                f"{origin}: not a Normalizer record ({exc}): {json.dumps(data)[:200]}"
            ) from exc
        if "fingerprint" in data and data["fingerprint"] != norm.fingerprint:
            raise NormalizerMismatch(
                f"{origin}: stored fingerprint {data['fingerprint']} does not match its statistics "
                f"({norm.fingerprint}); the record was edited or corrupted"
            )
        return norm

    def _tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._cache:
            mean = torch.tensor(self.mean, dtype=torch.float32, device=device)[:, None, None]
            inv = 1.0 / torch.tensor(self.std, dtype=torch.float32, device=device)[:, None, None]
            self._cache[key] = (mean, inv)
        return self._cache[key]
