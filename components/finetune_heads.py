"""finetune-heads: a segmentation head trained on a frozen encoder; metrics on whole scenes."""

from kfp.dsl import ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from components.base import train_component


@train_component
def finetune_heads(
    dataset: Input[Dataset],
    encoder: Input[Model],
    head: str,
    preset: str,
    overrides: list,
    tracking_uri: str,
    results: Output[Model],
    metrics: Output[Metrics],
    confusion_matrix: Output[ClassificationMetrics],
):
    """``head``: linear | conv | segmenter ("" = the preset's finetune.head). The whole-scene
    confusion matrix shows on the run page (``confusion_matrix``)."""
    from components import runtime

    runtime.finetune(dataset, encoder, head, preset, overrides, tracking_uri, results, metrics,
                     confusion_matrix)  # fmt: skip
