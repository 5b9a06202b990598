"""The page the report task emits when the report itself failed (or MLflow could not be told).

The report is the pipeline's exit task: KFP shows its Markdown and HTML outputs on the run
page, but only those of a task that succeeded (the KFP launcher publishes a task's output
artifacts after its command exits 0). So a failed report does not fail the task: it emits
this page instead, saying what failed, with the pipeline's own state, and where to look.
Never imports kfp.
"""

from __future__ import annotations

import html
import os
import traceback
from pathlib import Path

SA_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
TRACEBACK_LINES = 30


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def where_the_logs_are(kfp_run_id: str) -> list[str]:
    """Where this task's log is: the KFP UI, and kubectl in a pod (its name is $HOSTNAME)."""
    lines = [f"KFP UI: run `{kfp_run_id or '?'}` → the exit task `report` → *Logs*"]
    if SA_NAMESPACE_FILE.is_file():  # in a pod: KFP's step container is called "main"
        namespace = SA_NAMESPACE_FILE.read_text().strip()
        pod = os.environ.get("HOSTNAME", "<pod>")
        lines.append(f"`kubectl -n {namespace} logs {pod} -c main`")
    else:  # kfp.local: the component's output is in the terminal and the run's record folder
        lines.append("local run: the terminal of `hsissl-pipeline run-local`, and "
                     "`<run_dir>/pipeline-runs/<run id>/kfp/`")  # fmt: skip
    return lines


def failure_markdown(*, state: str, kfp_run_id: str, storage_uri: str, tracking_uri: str,
                     parent_run: str | None, report_error: BaseException | None,
                     lineage_error: BaseException | None) -> str:  # fmt: skip
    """The Markdown page: the pipeline's state, what failed, where the logs and results are."""
    what = "the report failed" if report_error else "the MLflow parent run could not be closed"
    lines = [
        f"# hsissl report: {what}",
        "",
        f"- **Pipeline state**: `{state}` (the stages' own outcome; this page is the exit task's)",
    ]
    if report_error is not None:
        lines.append(f"- **Report error**: `{_error(report_error)}`")
    if lineage_error is not None:
        lines.append(f"- **MLflow error** (parent run not marked `{state}`): "
                     f"`{_error(lineage_error)}`")  # fmt: skip
    lines.append(f"- **Logs**: {'; '.join(where_the_logs_are(kfp_run_id))}")
    mlflow = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "") or "the preset's"
    parent = f"parent run `{parent_run}`" if parent_run else "the parent run tagged kfp_run_id"
    lines.append(f"- **MLflow**: {parent} at {mlflow}, one nested run per stage "
                 f"(tag `kfp_run_id={kfp_run_id}`)")  # fmt: skip
    store = storage_uri or "the preset's storage.uri"
    lines.append(f"- **Results**: `{store}` (`results/`, `checkpoints/`, `datasets/`)")
    lines.append(f"- **Report again** when fixed: `hsissl-pipeline rerun --stage report "
                 f"--from-run {kfp_run_id or '<KFP run id>'} --host <KFP URL>`")  # fmt: skip
    for title, exc in (("Report traceback", report_error), ("MLflow traceback", lineage_error)):
        if exc is not None:
            tb = "".join(traceback.format_exception(exc)).rstrip().splitlines()
            lines += ["", f"## {title} (last {TRACEBACK_LINES} lines)", "", "```",
                      *tb[-TRACEBACK_LINES:], "```"]  # fmt: skip
    return "\n".join(lines) + "\n"


def failure_html(markdown: str) -> str:
    """The same page for the HTML output (the KFP UI renders HTML artifacts as they are)."""
    title = html.escape(markdown.splitlines()[0].lstrip("# "))
    return (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{title}</title></head>"
            f"<body><pre>{html.escape(markdown)}</pre></body></html>\n")  # fmt: skip
