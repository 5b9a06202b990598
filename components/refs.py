"""Existing store objects as typed artifacts: what a rerun starts from instead of recomputing."""

from kfp.dsl import Dataset, Model, Output

from components.base import cpu_component


@cpu_component
def dataset_ref(uri: str, preset: str, overrides: list, storage_uri: str, dataset: Output[Dataset]):
    """A committed dataset (``uri``, or the one the config names) as a Dataset artifact."""
    from components import references

    references.dataset_ref(uri, preset, overrides, storage_uri, dataset)


@cpu_component
def encoder_ref(
    uri: str,
    preset: str,
    overrides: list,
    storage_uri: str,
    method: str,
    source_run_id: str,
    encoder: Output[Model],
):
    """An encoder record (``uri``, ``random:<factory>``, or what pretraining ``method`` wrote in
    pipeline run ``source_run_id``) as a Model artifact."""
    from components import references

    references.encoder_ref(uri, preset, overrides, storage_uri, method, source_run_id, encoder)
