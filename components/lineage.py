"""Open and close the MLflow parent run that every stage run of one pipeline run nests under."""

from kfp.dsl import PipelineTaskFinalStatus

from components.base import cpu_component


@cpu_component
def open_lineage(
    preset: str, overrides: list, tracking_uri: str, kfp_run_id: str, source: str, storage_uri: str
) -> str:
    """Create the parent run tagged with the KFP run id and git SHA; returns its id."""
    from components import runtime

    params = {
        "preset": preset,
        "overrides": overrides,
        "source": source,
        "storage_uri": storage_uri,
    }
    return runtime.open_lineage(preset, overrides, tracking_uri, kfp_run_id, "hsissl", params)


@cpu_component
def close_lineage(
    preset: str,
    overrides: list,
    tracking_uri: str,
    kfp_run_id: str,
    status: PipelineTaskFinalStatus,
):
    """Exit task: mark the parent run FINISHED or FAILED with the pipeline's final state."""
    from components import runtime

    runtime.close_lineage(preset, overrides, tracking_uri, kfp_run_id, status.state)
