"""Decorators every component uses: lightweight Python components on our two images.

The images are set per task at compile time (``PipelineOptions``); the ``base_image`` here is
the default a component gets when used on its own. kfp is already in the images, so the
component command does not pip-install it at run time (which would need network access).
"""

from __future__ import annotations

from kfp import dsl

from components.images import image_ref

# From the registry/tag setting (pipelines/images.env), which CI publishes.
CPU_IMAGE = image_ref("cpu")  # images/cpu.Dockerfile: ingest, pca, report
TRAIN_IMAGE = image_ref("train")  # images/train.Dockerfile: CUDA stages


def cpu_component(func):
    """A component on the CPU image."""
    return dsl.component(func, base_image=CPU_IMAGE, install_kfp_package=False)


def train_component(func):
    """A component on the CUDA training image."""
    return dsl.component(func, base_image=TRAIN_IMAGE, install_kfp_package=False)
