"""pca-poc: PCA 32 -> 3 bands fitted on the training split, reconstruction checks."""

from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.base import cpu_component


@cpu_component
def pca_poc(
    dataset: Input[Dataset],
    preset: str,
    overrides: list,
    tracking_uri: str,
    results: Output[Model],
    metrics: Output[Metrics],
):
    """The dissertation's proof of concept (explained variance, reconstruction error)."""
    from components import runtime

    runtime.evaluate("pca_poc", "pca-poc", dataset, preset, overrides, tracking_uri, results,
                     metrics)  # fmt: skip
