"""Stage: one self-contained HTML report + a Markdown summary over everything in the store.

``hsissl report [report.name=…] [report.results=[a,b]]`` reads every ``results/*/metrics.json``
(or the named ones), the dataset manifest, the encoder records with their loss histories and
the MAE training states, and writes ``reports/<report.name>/{report.html, summary.md}`` (also
logged to MLflow). It is the pipeline's exit task, so a section whose inputs are missing says
"Not run" and a section that fails shows its error; neither stops the report.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from pathlib import Path

from hsissl.config import Config
from hsissl.layout import REPORT_HTML, REPORT_MARKDOWN, report_key, run_dir_of, storage_of
from hsissl.report.collect import collect
from hsissl.report.sections import render_report
from hsissl.stages.results import ReportResult
from hsissl.tracking import stage_run

log = logging.getLogger(__name__)


def run(cfg: Config) -> ReportResult:
    """Build and write the report; returns html_uri, markdown_uri, runs, sections, mismatches."""
    rc = cfg.report
    start = time.perf_counter()
    store = storage_of(cfg)
    with stage_run(cfg, "report") as tracker:
        inputs = collect(cfg)
        # The default name says nothing ("hsissl report: report"); the run folder does.
        title = f"hsissl report: {Path(cfg.run_dir).name}" + (
            f" ({rc.name})" if rc.name != "report" else ""
        )
        meta = [
            ("generated", datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")),
            ("artifact store", store.join("")),
            ("dataset", inputs.dataset_uri),
            ("dataset Normalizer", inputs.dataset_fingerprint or "none (no dataset)"),
        ]
        rendered = render_report(inputs, cfg, title, meta)
        page, summary, sections = rendered.page, rendered.summary, rendered.sections
        with store.transaction(report_key(rc.name)) as tx:
            tx.commit({REPORT_HTML: page.encode(), REPORT_MARKDOWN: summary.encode()})
        local = run_dir_of(cfg) / "report"
        local.mkdir(parents=True, exist_ok=True)
        (local / REPORT_HTML).write_text(page)
        (local / REPORT_MARKDOWN).write_text(summary)
        for name in (REPORT_HTML, REPORT_MARKDOWN):
            tracker.log_artifact(local / name, "report")
        mismatches = [f"{r.what} {r.name}" for r in rendered.fingerprints if r.matches is False]
        result = {
            "html_uri": store.join(report_key(rc.name, REPORT_HTML)),
            "markdown_uri": store.join(report_key(rc.name, REPORT_MARKDOWN)),
            "runs": [r.name for r in inputs.results],
            "encoders": [e.name for e in inputs.encoders],
            "sections": {s.id: s.status for s in sections},
            "mismatches": mismatches,
            "problems": inputs.problems,
            "seconds": time.perf_counter() - start,
        }
        tracker.log_dict(result, "report.json")
        tracker.set_tags({"report_uri": result["html_uri"], "mismatches": str(len(mismatches))})
    log.info(
        "report %s: %d runs, %d encoders, sections %s (%.1f s)",
        result["html_uri"],
        len(result["runs"]),
        len(result["encoders"]),
        result["sections"],
        result["seconds"],
    )
    return ReportResult(**result)
