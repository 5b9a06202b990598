"""Self-supervised and segmentation losses, one per file."""

from hsissl.losses.centering import Centering, sinkhorn_knopp
from hsissl.losses.dino import DINOLoss, soft_cross_entropy
from hsissl.losses.focal import FocalLoss
from hsissl.losses.ibot import IBOTPatchLoss
from hsissl.losses.koleo import KoLeoLoss
from hsissl.losses.mae import mae_loss

__all__ = [
    "Centering",
    "DINOLoss",
    "FocalLoss",
    "IBOTPatchLoss",
    "KoLeoLoss",
    "mae_loss",
    "sinkhorn_knopp",
    "soft_cross_entropy",
]
