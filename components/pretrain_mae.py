"""pretrain-mae: pretrain a masked autoencoder on the training tiles; writes an encoder record."""

from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.base import train_component


@train_component
def pretrain_mae(
    dataset: Input[Dataset],
    preset: str,
    overrides: list,
    tracking_uri: str,
    epochs: float,
    max_steps: int,
    kfp_run_id: str,
    encoder: Output[Model],
    metrics: Output[Metrics],
):
    """Resumes from this pipeline run's checkpoint when retried (epochs/max_steps 0 = preset)."""
    from components import runtime

    runtime.pretrain("mae", dataset, preset, overrides, tracking_uri, epochs, max_steps,
                     kfp_run_id, encoder, metrics)  # fmt: skip
