"""The report task's work in its pod: the report, then the MLflow parent run closed."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

from components.artifacts import fetch
from components.runtime import call_stage, close_lineage, setup_logging
from hsissl import tracking_lineage as lineage
from hsissl.presets import stage_config

log = logging.getLogger("hsissl.components")


def report(preset: str, overrides: list[str], storage_uri: str, tracking_uri: str,
           kfp_run_id: str, state: str, html: Any, markdown: Any) -> dict[str, Any]:  # fmt: skip
    """The report over everything in the store, then the parent run closed with ``state``, the
    pipeline's own state, whatever happened to the report. If the report fails (or MLflow
    cannot be told), the task still succeeds and its outputs are a page saying what failed
    and where the logs are (``components.report_failure``): a failed report must neither
    hide the run page nor turn a successful pipeline into a failed one. Returns the report's
    result as a dict, with ``failed`` (report | mlflow) when something failed."""
    setup_logging()
    result: dict[str, Any] = {}
    report_error: Exception | None = None
    try:
        cfg = stage_config(
            preset, overrides, {"storage.uri": storage_uri, "tracking.uri": tracking_uri}
        )
        outcome = call_stage("report", cfg, kfp_run_id)
        result = outcome.to_dict()
        for artifact, uri in ((html, outcome.html_uri), (markdown, outcome.markdown_uri)):
            Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
            Path(artifact.path).write_bytes(fetch(uri))  # the KFP UI renders the content itself
            artifact.metadata["uri"] = uri
    except Exception as exc:
        log.exception("the report failed; the pipeline's state (%s) still goes to MLflow", state)
        report_error = exc
    except BaseException:  # interrupted: still the pipeline's state, not the report's
        with contextlib.suppress(Exception):  # keep the interruption, not a closing error
            close_lineage(preset, overrides, tracking_uri, kfp_run_id, state)
        raise
    parent, lineage_error = None, None
    try:
        parent = close_lineage(preset, overrides, tracking_uri, kfp_run_id, state)
        if parent and report_error is not None:
            cfg = stage_config(preset, overrides, {"tracking.uri": tracking_uri})
            lineage.tag_report_failure(cfg, parent, report_error)
    except Exception as exc:
        log.exception("MLflow parent run of %s not closed", kfp_run_id)
        lineage_error = exc
    if report_error is not None or lineage_error is not None:
        from components.report_failure import failure_html, failure_markdown

        page = failure_markdown(state=state, kfp_run_id=lineage.pipeline_run_id(kfp_run_id),
                                storage_uri=storage_uri, tracking_uri=tracking_uri,
                                parent_run=parent, report_error=report_error,
                                lineage_error=lineage_error)  # fmt: skip
        if report_error is None:  # the report is there: the note goes under it
            page = Path(markdown.path).read_text() + "\n---\n\n" + page
        for artifact, text in ((markdown, page), (html, failure_html(page))):
            if report_error is not None or artifact is markdown:
                Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
                Path(artifact.path).write_text(text)
        markdown.metadata["failed"] = "report" if report_error is not None else "mlflow"
        result = {**result, "failed": markdown.metadata["failed"]}
    return result
