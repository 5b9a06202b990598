"""The Orbita OHS sensor and the WHU-OHS label set: the one place these facts live.

Band centres and class names are from the dissertation's Figures 3.1 and 3.2
(Li et al. 2022). The figure prints band 9 as 569 nm, which breaks the monotone
~15 nm sequence; 596 nm is taken as the intended value.
"""

from __future__ import annotations

BAND_CENTRES_NM: tuple[int, ...] = (
    466, 480, 500, 520, 536, 550, 566, 580, 596, 610, 626, 640, 656, 670, 686, 700,
    716, 730, 746, 760, 776, 790, 806, 820, 836, 850, 866, 880, 896, 910, 926, 940,
)  # fmt: skip
NUM_BANDS = len(BAND_CENTRES_NM)  # 32

# Band widths (FWHM). The WHU-OHS release describes the 32 channels as having "an average
# spectral resolution of 15 nm" (Li, Huang & Tu 2022, Int. J. Appl. Earth Obs. Geoinf. 113,
# 103022; dataset page http://irsip.whu.edu.cn/resources/WHU_OHS_show.php). No per-band widths
# are published with the data, so every band gets that average; it matches the ~15 nm spacing
# of the centres. Used as the Gaussian spectral response of each OHS band (data/resample.py).
BAND_FWHM_NM: tuple[float, ...] = (15.0,) * NUM_BANDS

# Index 0 is "unlabelled": ignored by losses and metrics.
CLASS_NAMES: tuple[str, ...] = (
    "unlabelled",
    "Paddy field", "Dry farm", "Woodland", "Shrubbery", "Sparse woodland",
    "Other forest land", "High-covered grassland", "Medium-covered grassland",
    "Low-covered grassland", "River canal", "Lake", "Reservoir pond", "Beach land",
    "Shoal", "Urban built-up", "Rural settlement", "Other construction land", "Sand",
    "Gobi", "Saline-alkali soil", "Marshland", "Bare land", "Bare rock", "Ocean",
)  # fmt: skip
NUM_CLASSES = len(CLASS_NAMES) - 1  # 24 land-cover classes
IGNORE_INDEX = 0

# WHU-OHS layout: <root>/<split>/image/*.tif and <root>/<split>/label/*.tif, paired by name.
SPLITS: tuple[str, ...] = ("tr", "va", "ts")
SCENE_SIZE = 512
REFLECTANCE_SCALE = 10000  # stored value = reflectance x 10000, 16-bit integer

# Bands closest to red (~640 nm), green (~550 nm) and blue (~480 nm) for RGB composites.
RGB_BANDS: tuple[int, int, int] = (
    BAND_CENTRES_NM.index(640),
    BAND_CENTRES_NM.index(550),
    BAND_CENTRES_NM.index(480),
)


def band_index(nm: float) -> int:
    """Index of the OHS band whose centre is closest to ``nm``."""
    return min(range(NUM_BANDS), key=lambda i: abs(BAND_CENTRES_NM[i] - nm))
