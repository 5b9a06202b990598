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
    data_pvc: str = "",
    pvc_mounted: bool = False,
):
    """Ingest ``source``: s3://bucket/prefix, a folder in the pod (``data_pvc``, mounted when
    ``pvc_mounted``), or "generated" ("" too, outside a cluster); ``dataset`` points at the
    shards."""
    from components import ingest_task

    ingest_task.check_claim(data_pvc, pvc_mounted)
    ingest_task.ingest(source, preset, overrides, storage_uri, tracking_uri, dataset)
