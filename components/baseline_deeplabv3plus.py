"""baseline-deeplabv3plus: DeepLabV3+ (ResNet-50 V1c) trained from scratch on whole scenes."""

from kfp.dsl import ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from components.base import train_component


@train_component
def baseline_deeplabv3plus(
    dataset: Input[Dataset],
    preset: str,
    overrides: list,
    tracking_uri: str,
    results: Output[Model],
    metrics: Output[Metrics],
    confusion_matrix: Output[ClassificationMetrics],
):
    """The supervised baseline every pretrained encoder is compared with; its whole-scene
    confusion matrix shows on the run page (``confusion_matrix``)."""
    from components import runtime

    runtime.evaluate("baseline", "baseline-deeplabv3plus", dataset, preset, overrides,
                     tracking_uri, results, metrics, confusion_matrix)  # fmt: skip
