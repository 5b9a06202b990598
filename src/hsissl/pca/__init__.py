"""The PCA proof of concept: how much of the 32-band spectrum a few PCA components keep.

:mod:`~hsissl.pca.basis` fits the PCA, :mod:`~hsissl.pca.decoders` maps components back to
bands, :mod:`~hsissl.pca.training` trains such a decoder and :mod:`~hsissl.pca.check` measures
every reconstruction's per-band error (PCA inverse, decoder, optionally a pretrained MAE).
"""

from hsissl.pca.basis import PCA, fit_pca, project, reconstruct, sample_pixels
from hsissl.pca.decoders import BandDecoder, ViTBandDecoder, make_decoder

__all__ = [
    "PCA",
    "BandDecoder",
    "ViTBandDecoder",
    "fit_pca",
    "make_decoder",
    "project",
    "reconstruct",
    "sample_pixels",
]
