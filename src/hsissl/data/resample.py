"""Spectral resampling of any sensor's bands to the 32 OHS bands.

Two methods, both a (B, T) weight matrix applied to every pixel's spectrum:

- ``linear``: linear interpolation of the source band centres at the OHS centres (the
  fallback when the source's band widths are unknown).
- ``gaussian-srf``: each band is modelled by a Gaussian spectral response function (SRF) of
  its FWHM. A source sample is the true spectrum blurred by the source SRF; the OHS band is the
  spectrum blurred by the OHS SRF, i.e. the source-blurred spectrum blurred further by a
  Gaussian of variance sigma_ohs^2 - sigma_src^2 (Gaussians compose). That extra kernel is
  integrated exactly against the piecewise-linear curve through the source samples. Where a
  source band is already as wide as the OHS band, nothing is added (the result is linear).

Outside the source's wavelength range the edge band is held constant (extrapolation), in both
methods; which OHS bands that affects is reported so callers can refuse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from hsissl.data.ohs import BAND_CENTRES_NM, BAND_FWHM_NM

METHODS = ("auto", "linear", "gaussian-srf")
FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))

# Spellings of wavelength units (ENVI "wavelength units", GDAL, sidecars) -> nanometres per unit.
UNITS_TO_NM: dict[str, float] = {
    "nm": 1.0, "nanometer": 1.0, "nanometers": 1.0, "nanometre": 1.0, "nanometres": 1.0,
    "um": 1000.0, "µm": 1000.0, "μm": 1000.0, "micrometer": 1000.0, "micrometers": 1000.0,
    "micrometre": 1000.0, "micrometres": 1000.0, "micron": 1000.0, "microns": 1000.0,
}  # fmt: skip


class ConvertError(ValueError):
    """A source that cannot be converted to OHS bands (bad wavelengths, widths, layout, labels);
    the message names the file and the field. Nothing is left half-written."""


def units_to_nm(units: str | None, where: str, field_name: str = "wavelength units") -> float:
    """Nanometres per unit of ``units``; unknown or missing units are an error naming ``where``."""
    key = (units or "").strip().lower()
    if key not in UNITS_TO_NM:
        raise ConvertError(
            f"{where}: {field_name}: found {units!r}, expected nm or micrometers "
            f"(any of {sorted(UNITS_TO_NM)})"
        )
    return UNITS_TO_NM[key]


def check_centres(wl_nm: np.ndarray, where: str, field_name: str = "wavelength") -> np.ndarray:
    """Float64 copy of ``wl_nm`` after checking it is >= 2 finite, strictly increasing values."""
    wl = np.asarray(wl_nm, dtype=np.float64)
    if wl.ndim != 1 or wl.size < 2 or not np.all(np.isfinite(wl)):
        raise ConvertError(
            f"{where}: {field_name}: found {wl.size} value(s), expected >= 2 finite band centres"
        )
    steps = np.diff(wl)
    if not np.all(steps > 0):
        i = int(np.argmin(steps > 0))
        raise ConvertError(
            f"{where}: {field_name}: not strictly increasing (band {i + 1} = {wl[i]:g} nm, "
            f"band {i + 2} = {wl[i + 1]:g} nm), expected increasing band centres"
        )
    return wl


def extrapolated_bands(
    wl_nm: np.ndarray, targets_nm: tuple[float, ...] = BAND_CENTRES_NM
) -> list[float]:
    """Target centres (nm) outside the source's wavelength range: filled from the edge band."""
    lo, hi = float(np.min(wl_nm)), float(np.max(wl_nm))
    return [c for c in targets_nm if c < lo or c > hi]


def linear_weights(
    wl_nm: np.ndarray, targets_nm: tuple[float, ...] = BAND_CENTRES_NM
) -> np.ndarray:
    """(B, T) matrix W with spectrum @ W = linear interpolation of the spectrum at ``targets_nm``.

    Targets outside [first, last] band take the nearest edge band (weight 1).
    """
    wl = check_centres(wl_nm, "linear_weights")
    t = np.clip(np.asarray(targets_nm, dtype=np.float64), wl[0], wl[-1])  # edge extrapolation
    upper = np.clip(np.searchsorted(wl, t, side="right"), 1, wl.size - 1)  # (T,)
    lower = upper - 1
    frac = (t - wl[lower]) / (wl[upper] - wl[lower])  # (T,) 0 at lower, 1 at upper
    weights = np.zeros((wl.size, t.size))
    cols = np.arange(t.size)
    weights[lower, cols] += 1.0 - frac
    weights[upper, cols] += frac
    return weights


def kernel_weights(wl_nm: np.ndarray, targets_nm: np.ndarray, cdf, moment) -> np.ndarray:
    """(B, T) weights: target t's kernel integrated against the piecewise-linear source curve.

    ``cdf(d)`` and ``moment(d)`` give, for offsets d = wavelength - target centre (B, T), the
    kernel's integral and first moment from -inf to d. The curve is linear between source
    centres and constant beyond the edges, so each column sums to the kernel's total (1).
    """
    wl = np.asarray(wl_nm, dtype=np.float64)
    d = wl[:, None] - np.asarray(targets_nm, dtype=np.float64)[None, :]  # (B, T)
    k0, k1 = cdf(d), moment(d)  # (B, T) each
    h = np.diff(wl)[:, None]  # (B-1, 1)
    dk0, dk1 = np.diff(k0, axis=0), np.diff(k1, axis=0)  # (B-1, T): mass / moment per segment
    weights = np.zeros_like(d)
    weights[:-1] += (d[1:] * dk0 - dk1) / h  # left end of each segment
    weights[1:] += (dk1 - d[:-1] * dk0) / h  # right end
    weights[0] += k0[0]  # everything below the first centre
    weights[-1] += 1.0 - k0[-1]  # ... and above the last
    return weights


def gaussian_kernel(sigma: np.ndarray):
    """(cdf, moment) of zero-mean Gaussians with per-target ``sigma`` (0 = a delta)."""
    from scipy.special import ndtr  # the normal CDF; scipy only where SRFs are computed

    sigma = np.asarray(sigma, dtype=np.float64)[None, :]  # (1, T)
    safe = np.where(sigma > 0, sigma, 1.0)

    def cdf(d: np.ndarray) -> np.ndarray:
        return np.where(sigma > 0, ndtr(d / safe), (d >= 0).astype(np.float64))

    def moment(d: np.ndarray) -> np.ndarray:
        pdf = np.exp(-0.5 * (d / safe) ** 2) / math.sqrt(2 * math.pi)
        return np.where(sigma > 0, -safe * pdf, 0.0)

    return cdf, moment


def box_kernel(width: np.ndarray):
    """(cdf, moment) of zero-centred boxes of per-target ``width`` (uniform response)."""
    half = np.asarray(width, dtype=np.float64)[None, :] / 2.0

    def cdf(d: np.ndarray) -> np.ndarray:
        return np.clip((d + half) / (2 * half), 0.0, 1.0)

    def moment(d: np.ndarray) -> np.ndarray:
        return (np.clip(d, -half, half) ** 2 - half**2) / (4 * half)

    return cdf, moment


def srf_weights(
    wl_nm: np.ndarray,
    fwhm_nm: np.ndarray,
    targets_nm: tuple[float, ...] = BAND_CENTRES_NM,
    target_fwhm_nm: tuple[float, ...] = BAND_FWHM_NM,
) -> tuple[np.ndarray, list[float]]:
    """Gaussian-SRF weights (B, T) and the target centres where the source is as wide or wider.

    The extra blur per target is sqrt(sigma_target^2 - sigma_source^2), sigma_source taken from
    the source FWHM interpolated at the target centre.
    """
    wl = check_centres(wl_nm, "srf_weights")
    fwhm = np.asarray(fwhm_nm, dtype=np.float64)
    targets = np.asarray(targets_nm, dtype=np.float64)
    src_sigma = np.interp(targets, wl, fwhm) * FWHM_TO_SIGMA  # (T,)
    tgt_sigma = np.asarray(target_fwhm_nm, dtype=np.float64) * FWHM_TO_SIGMA  # (T,)
    extra = np.sqrt(np.clip(tgt_sigma**2 - src_sigma**2, 0.0, None))
    wider = [float(c) for c, e in zip(targets, extra, strict=True) if e == 0.0]
    return kernel_weights(wl, targets, *gaussian_kernel(extra)), wider


@dataclass(frozen=True)
class Resampling:
    """How one source grid becomes OHS bands: the weights and what to record about them."""

    method: str  # "linear" | "gaussian-srf"
    weights: np.ndarray = field(repr=False)  # (B, T)
    extrapolated_nm: list[float]  # target centres outside the source range (edge band held)
    notes: list[str]


def plan(
    wl_nm: np.ndarray,
    fwhm_nm: np.ndarray | None,
    method: str = "auto",
    where: str = "source",
) -> Resampling:
    """The resampling for a source grid: ``auto`` = Gaussian SRFs when FWHM is known, else linear."""
    if method not in METHODS:
        raise ConvertError(
            f"{where}: resampling: found {method!r}, expected one of {' | '.join(METHODS)}"
        )
    wl = check_centres(wl_nm, where)
    extrapolated = extrapolated_bands(wl)
    if method == "gaussian-srf" and fwhm_nm is None:
        raise ConvertError(
            f"{where}: fwhm: none given, expected band widths for resampling=gaussian-srf "
            "(or use resampling=linear)"
        )
    if fwhm_nm is None or method == "linear":
        why = "band widths unknown" if fwhm_nm is None else "linear requested"
        return Resampling("linear", linear_weights(wl), extrapolated,
                          [f"linear interpolation of band centres ({why})"])  # fmt: skip
    fwhm = np.asarray(fwhm_nm, dtype=np.float64)
    if fwhm.shape != wl.shape or not np.all(np.isfinite(fwhm)) or np.any(fwhm <= 0):
        raise ConvertError(
            f"{where}: fwhm: found {fwhm.size} value(s) (min {np.min(fwhm) if fwhm.size else None}), "
            f"expected {wl.size} positive widths, one per band"
        )
    weights, wider = srf_weights(wl, fwhm)
    notes = [f"Gaussian SRFs: source FWHM from the file, OHS FWHM {sorted(set(BAND_FWHM_NM))} nm"]
    if wider:
        notes.append(f"source bands as wide as or wider than the OHS band at {wider} nm: "
                     "no extra smoothing there (linear)")  # fmt: skip
    return Resampling("gaussian-srf", weights, extrapolated, notes)


def apply(cube_hwb: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(H, W, B) cube -> (H, W, T) float64: every pixel's spectrum times the (B, T) weights."""
    if cube_hwb.ndim != 3 or cube_hwb.shape[2] != weights.shape[0]:
        raise ValueError(
            f"cube: found shape {cube_hwb.shape}, expected (H, W, {weights.shape[0]}) to match "
            f"the wavelength grid"
        )
    h, w, b = cube_hwb.shape
    flat = cube_hwb.reshape(-1, b).astype(np.float64)  # (H*W, B)
    return (flat @ weights).reshape(h, w, weights.shape[1])  # (H, W, T)
