"""The report page and summary rendered from a fixed small input are the ones recorded before
the HTML moved into hsissl.report's Jinja2 templates: every heading, table cell (with its
classes and data-value), caption, paragraph and list item, in page order, and the Markdown
summary line for line. Values are escaped exactly once."""

from __future__ import annotations

import json
from pathlib import Path

import report_fixture
from hsissl.config import load_config
from hsissl.report.sections import render_report
from report_facts import page_facts

GOLDEN = Path(__file__).parent / "data" / "report_golden.json"


def rendered():
    cfg = load_config(None, ["report.scenes=1"])
    return render_report(report_fixture.inputs(), cfg, report_fixture.TITLE, report_fixture.META)


def test_page_and_summary_are_the_recorded_ones():
    golden = json.loads(GOLDEN.read_text())
    report = rendered()
    assert page_facts(report.page) == golden["page"]
    assert report.summary.splitlines() == golden["summary"]
    statuses = {s.id: s.status for s in report.sections}
    assert statuses == {"results": "ok", "training": "ok", "per-class": "ok", "maps": "ok",
                        "attention": "failed", "mae": "not run", "pca": "ok", "data": "ok",
                        "real": "ok"}  # fmt: skip


def test_values_are_escaped_once():
    page = rendered().page
    assert "<h1>hsissl report: run &lt;x&gt; &amp; &#34;y&#34;</h1>" in page
    assert "<code>stale &lt;b&gt;</code>" in page and "stale <b>" not in page
    assert "a problem &amp; &lt;its&gt; reason" in page
    for twice in ("&amp;lt;", "&amp;amp;", "&amp;#34;", "&amp;quot;"):
        assert twice not in page
