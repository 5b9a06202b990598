"""hsissl: self-supervised pretraining for hyperspectral satellite imagery."""

__version__ = "0.1.0"
