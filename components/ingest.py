"""ingest: validate scenes, tile, shard into the artifact store, band statistics."""

from kfp.dsl import Dataset, Output

from components.base import cpu_component


@cpu_component
def ingest(
    source: str,
    preset: str,
    overrides: list,
    storage_uri: str,
    tracking_uri: str,
    dataset: Output[Dataset],
):
    """Ingest ``source`` ("" = the generated dataset); ``dataset`` points at the shards."""
    from components import runtime

    runtime.ingest(source, preset, overrides, storage_uri, tracking_uri, dataset)
