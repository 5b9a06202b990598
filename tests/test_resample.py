"""Spectral resampling to the OHS bands (hsissl.data.resample): Gaussian SRFs from FWHM, linear
fallback, and the kernel integration both rest on."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hsissl.data.ohs import BAND_CENTRES_NM, BAND_FWHM_NM
from hsissl.data.resample import (
    FWHM_TO_SIGMA,
    ConvertError,
    box_kernel,
    kernel_weights,
    linear_weights,
    plan,
    srf_weights,
    units_to_nm,
)

CENTRES = np.asarray(BAND_CENTRES_NM, dtype=np.float64)
SIGMA_OHS = np.asarray(BAND_FWHM_NM) * FWHM_TO_SIGMA


def blurred_dip(centres: np.ndarray, sigma: float | np.ndarray) -> np.ndarray:
    """A smooth spectrum 0.5 - 0.3 * exp(-(l - 700)^2 / (2 * 12^2)) seen through Gaussian SRFs of
    ``sigma`` at ``centres``: exact, since a Gaussian blurred by a Gaussian stays Gaussian."""
    width = np.sqrt(12.0**2 + np.asarray(sigma) ** 2)
    return 0.5 - 0.3 * (12.0 / width) * np.exp(-((centres - 700.0) ** 2) / (2 * width**2))


def test_smooth_spectrum_through_gaussian_srfs_matches_the_analytic_integral():
    src = np.arange(420.0, 990.0, 2.5)  # a sensor sampled every 2.5 nm, FWHM 6 nm
    fwhm = np.full(src.size, 6.0)
    measured = blurred_dip(src, 6.0 * FWHM_TO_SIGMA)  # what that sensor records
    truth = blurred_dip(CENTRES, SIGMA_OHS)  # what OHS would record
    srf = plan(src, fwhm).weights
    got = measured @ srf
    # Dip depth 0.3: within 0.3 %; what is left is the piecewise-linear curve between samples.
    np.testing.assert_allclose(got, truth, atol=1e-3)
    # ... and clearly better than interpolating centres, which keeps the sharper 6 nm dip.
    linear_err = np.abs(measured @ linear_weights(src) - truth).max()
    assert np.abs(got - truth).max() < linear_err / 5, (np.abs(got - truth).max(), linear_err)


def test_narrow_bands_converge_to_linear_interpolation():
    rng = np.random.default_rng(0)
    src = np.sort(rng.uniform(400, 1000, 80))
    spectrum = np.sin(src / 37.0) + src / 800.0
    linear = spectrum @ linear_weights(src)
    errors = []
    for width in (8.0, 2.0, 0.5, 0.01):  # source and OHS bands both narrowing
        weights, _ = srf_weights(src, np.full(src.size, width / 2), target_fwhm_nm=(width,) * 32)
        errors.append(np.abs(spectrum @ weights - linear).max())
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-9, errors


def test_source_as_wide_as_ohs_adds_no_smoothing():
    src = np.linspace(450, 960, 60)
    weights, wider = srf_weights(src, np.full(src.size, 20.0))  # wider than 15 nm everywhere
    np.testing.assert_allclose(weights, linear_weights(src), atol=1e-12)
    assert wider == list(CENTRES)


def test_flat_spectrum_stays_flat_including_extrapolated_bands():
    src = np.linspace(500, 900, 41)  # leaves 466-480 and 910-940 outside
    for weights in (plan(src, np.full(41, 10.0)).weights, plan(src, None).weights):
        np.testing.assert_allclose(np.full(41, 1234.5) @ weights, 1234.5, rtol=0, atol=1e-9)


def test_box_srf_preserves_energy():
    """Contiguous box bands tiling [500, 900] nm together see exactly the integral of the
    (piecewise-linear) source spectrum over that range."""
    src = np.linspace(480.0, 920.0, 23)  # 20 nm sampling
    spectrum = np.random.default_rng(1).uniform(0, 1, src.size)
    edges = np.sort(np.r_[500.0, np.random.default_rng(2).uniform(500, 900, 11), 900.0])
    centres, widths = (edges[1:] + edges[:-1]) / 2, np.diff(edges)
    band_means = spectrum @ kernel_weights(src, centres, *box_kernel(widths))
    inside = (src >= 500) & (src <= 900)
    knots = np.r_[500.0, src[inside], 900.0]
    energy = np.trapezoid(np.interp(knots, src, spectrum), knots)  # exact for linear pieces
    assert math.isclose(float(band_means @ widths), float(energy), rel_tol=1e-12)


def test_plan_records_the_method_and_refuses_bad_widths():
    src = np.linspace(400, 1000, 61)
    assert plan(src, None).method == "linear"
    assert plan(src, np.full(61, 10.0)).method == "gaussian-srf"
    assert plan(src, np.full(61, 10.0), method="linear").method == "linear"
    with pytest.raises(ConvertError, match="fwhm: none given"):
        plan(src, None, method="gaussian-srf")
    with pytest.raises(ConvertError, match="fwhm: found 3 value"):
        plan(src, np.ones(3), where="x.hdr")
    with pytest.raises(ConvertError, match="resampling: found 'cubic'"):
        plan(src, None, method="cubic")


def test_units():
    assert units_to_nm("Micrometers", "x") == 1000.0 and units_to_nm("nm", "x") == 1.0
    with pytest.raises(ConvertError, match="x.hdr: wavelength units: found 'Wavenumber'"):
        units_to_nm("Wavenumber", "x.hdr")
    with pytest.raises(ConvertError, match="found None"):
        units_to_nm(None, "x.hdr")
