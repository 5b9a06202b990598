"""report: one HTML page + Markdown summary over every result in the store; closes lineage."""

from kfp.dsl import HTML, Markdown, Output, PipelineTaskFinalStatus

from components.base import cpu_component


@cpu_component
def report(
    preset: str,
    overrides: list,
    storage_uri: str,
    tracking_uri: str,
    kfp_run_id: str,
    status: PipelineTaskFinalStatus,
    html: Output[HTML],
    markdown: Output[Markdown],
):
    """The pipeline's exit task: runs after every stage (also after a failure, reporting what
    finished) and marks the MLflow parent run with the pipeline's final state."""
    from components import report_task

    report_task.report(preset, overrides, storage_uri, tracking_uri, kfp_run_id, status.state,
                       html, markdown)  # fmt: skip
