"""evaluate-real's per-scene table: means over seeds and paired per-seed differences."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hsissl.report.real_table import BEGIN, END, markdown, replace_block, scene_tables

# Hand-made scores of one scene and protocol over three seeds. The floors: lr has the higher
# mean (0.50 vs 0.45), so it is the floor every model is compared with, seed by seed.
SCORES = {
    0: {"pixel-lr": 0.50, "pixel-rf": 0.40, "deeplabv3plus": 0.55,
        "random-init+probe": 0.45, "mae+probe": 0.60, "mae+linear": 0.52},
    1: {"pixel-lr": 0.40, "pixel-rf": 0.45, "deeplabv3plus": 0.35,
        "random-init+probe": 0.40, "mae+probe": 0.46, "mae+linear": 0.41},
    2: {"pixel-lr": 0.60, "pixel-rf": 0.50, "deeplabv3plus": 0.65,
        "random-init+probe": 0.50, "mae+probe": 0.63, "mae+linear": 0.62},
}  # fmt: skip
ROWS = [{"scene": "s", "protocol": "few-label", "seed": k, "miou": v} for k, v in SCORES.items()]


def _entry(tables, model):
    return next(e for e in tables["s"]["few-label"]["models"] if e["model"] == model)


def test_paired_differences_by_hand():
    tables = scene_tables(ROWS)
    assert tables["s"]["few-label"]["floor"] == "pixel-lr"
    assert tables["s"]["few-label"]["seeds"] == [0, 1, 2]
    mae = _entry(tables, "mae+probe")
    assert mae["miou"]["mean"] == pytest.approx((0.60 + 0.46 + 0.63) / 3)
    # vs floor: 0.10, 0.06, 0.03 -> mean 0.0633.., population std of those three
    d = [0.10, 0.06, 0.03]
    mean = sum(d) / 3
    std = (sum((x - mean) ** 2 for x in d) / 3) ** 0.5
    assert mae["vs_floor"]["mean"] == pytest.approx(mean)
    assert mae["vs_floor"]["std"] == pytest.approx(std)
    # vs control (random-init+probe): 0.15, 0.06, 0.13
    assert mae["vs_control"]["mean"] == pytest.approx((0.15 + 0.06 + 0.13) / 3)
    # The paired spread is not the difference of the unpaired spreads: the unpaired std of
    # mae+probe and pixel-lr are both large (the seed-1 split is hard for everyone) ...
    assert mae["miou"]["std"] > 0.07 and _entry(tables, "pixel-lr")["miou"]["std"] > 0.08
    assert mae["vs_floor"]["std"] < 0.03  # ... the paired one is small
    # no control for a head without a random-init row; none for floors, baseline and control
    assert _entry(tables, "mae+linear")["vs_control"] is None
    for model in ("pixel-lr", "pixel-rf", "deeplabv3plus", "random-init+probe"):
        assert _entry(tables, model)["vs_control"] is None
    assert _entry(tables, "pixel-lr")["vs_floor"] is None  # not compared with itself
    assert _entry(tables, "pixel-rf")["vs_floor"]["mean"] == pytest.approx(-0.05)
    roles = [e["role"] for e in tables["s"]["few-label"]["models"]]
    assert roles == ["floor", "floor", "baseline", "control", "pretrained", "pretrained"]


def test_each_method_is_compared_with_the_control_of_its_own_architecture():
    """evaluate-real names the control of a second architecture random-init@<method>; a method
    without one (MAE here: the first method's architecture) keeps random-init."""
    rows = [{"scene": "s", "protocol": "few-label", "seed": r["seed"],
             "miou": r["miou"] | {"dinov2+probe": 0.30 + 0.01 * r["seed"], "random-init@dinov2+probe": 0.20}}
            for r in ROWS]  # fmt: skip
    tables = scene_tables(rows)
    dino = _entry(tables, "dinov2+probe")
    assert dino["vs_control"]["mean"] == pytest.approx(0.11) and dino["vs_control"]["std"] > 0
    assert _entry(tables, "mae+probe")["vs_control"]["mean"] == pytest.approx(
        (0.15 + 0.06 + 0.13) / 3
    )
    control = _entry(tables, "random-init@dinov2+probe")
    assert control["role"] == "control" and control["vs_control"] is None
    assert control["label"] == "random-init (DINOv2 arch.) + probe"
    order = [e["model"] for e in tables["s"]["few-label"]["models"]]
    assert (
        order.index("mae+linear")
        < order.index("random-init@dinov2+probe")
        < order.index("dinov2+probe")
    )


def test_paired_difference_uses_shared_seeds_only():
    rows = ROWS + [{"scene": "s", "protocol": "few-label", "seed": 3, "miou": {"mae+probe": 0.9}}]
    mae = _entry(scene_tables(rows), "mae+probe")
    assert mae["miou"]["n"] == 4 and mae["vs_floor"]["seeds"] == [0, 1, 2]
    assert mae["vs_floor"]["mean"] == pytest.approx((0.10 + 0.06 + 0.03) / 3)


def test_markdown_has_one_table_per_scene_with_signed_differences():
    rows = ROWS + [dict(r, scene="t", protocol="half") for r in ROWS]
    text = markdown(scene_tables(rows))
    assert text.count("### ") == 2 and "### s" in text and "### t" in text
    line = next(x for x in text.splitlines() if x.startswith("| MAE + probe"))
    assert line == "| MAE + probe | 56.3 ± 7.4 | +6.3 ± 2.9 | +11.3 ± 3.9 |"
    assert "few-label Δ floor (pixel-lr)" in text
    json.dumps(scene_tables(rows))  # the JSON file holds the same tables


def test_markdown_states_what_the_encoders_were_pretrained_on():
    data = {
        "scenes": ["a", "b"],
        "tiles": 94,
        "tile_size": 64,
        "stride": 16,
        "pixels": 123456,
        "steps": 300,
    }
    text = markdown(scene_tables(ROWS), data)
    assert text.startswith(
        "Pretraining data: 94 tiles of 64×64 px (stride 16) from 2 scenes (a, b), "
        "123,456 distinct pixels; 300 steps per method.\n\n### s"
    )
    assert "distinct pixels" not in markdown(scene_tables(ROWS), data | {"pixels": None})


def test_replace_block_keeps_the_rest_and_refuses_missing_markers():
    doc = f"intro\n{BEGIN}\nold\n{END}\noutro\n"
    assert replace_block(doc, "new\n") == f"intro\n{BEGIN}\nnew\n{END}\noutro\n"
    with pytest.raises(ValueError, match="docs/x.md: expected one"):
        replace_block("no markers", "new", "docs/x.md")


def test_report_renders_the_real_eval_tables_with_a_bar_plot(tmp_path):
    """A store with an evaluate-real result gets a "Real scenes" section: the table's numbers
    and one bar plot per scene (the other sections say "Not run", as for any missing input)."""
    from hsissl.config import load_config
    from hsissl.layout import storage_of
    from hsissl.stages import report

    cfg = load_config(None, [f"run_dir={tmp_path}", "tracking.uri="])
    metrics = {"kind": "real-eval", "name": "real-eval", "rows": ROWS,
               "tables": scene_tables(ROWS)}  # fmt: skip
    storage_of(cfg).put_bytes("results/real-eval/metrics.json", json.dumps(metrics).encode())
    result = report.run(cfg)
    assert result.sections["real"] == "ok"
    page = storage_of(cfg).get_bytes("reports/report/report.html").decode()
    real = page[page.index('<section id="real">') :]
    real = real[: real.index("</section>")]
    assert "9. Real scenes (evaluate-real)" in real
    assert real.count("<img") == 1  # one scene: one figure
    assert "MAE + probe" in real and "+6.3 ± 2.9" in real and "+11.3 ± 3.9" in real
    assert "Δ vs floor (pixel-lr), pp" in real


def test_report_has_no_real_section_without_evaluate_real(tmp_path):
    from hsissl.config import load_config
    from hsissl.stages import report

    cfg = load_config(None, [f"run_dir={tmp_path}", "tracking.uri="])
    assert "real" not in report.run(cfg).sections


SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "real_table.py"


def _script(*args: object, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)  # fmt: skip


def test_script_regenerates_the_docs_table_from_metrics_files(tmp_path):
    # two processes, one scene each (as docs/real-data.md's runs): the rows are merged
    for scene in ("s", "t"):
        rows = [dict(r, scene=scene) for r in ROWS]
        (tmp_path / f"{scene}.json").write_text(json.dumps({"kind": "real-eval", "rows": rows}))
    doc = tmp_path / "real-data.md"
    doc.write_text(f"# Results\n\nhand-written text\n{BEGIN}\nstale table\n{END}\nmore text\n")
    done = _script(tmp_path / "s.json", tmp_path / "t.json", "--write", doc, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    text = doc.read_text()
    assert "stale table" not in text and text.startswith("# Results\n\nhand-written text\n")
    assert text.endswith(f"{END}\nmore text\n")
    assert "### s" in text and "### t" in text
    assert "| MAE + probe | 56.3 ± 7.4 | +6.3 ± 2.9 | +11.3 ± 3.9 |" in text
    printed = _script(tmp_path / "s.json", cwd=tmp_path)  # no --write: the table on stdout
    assert printed.returncode == 0 and printed.stdout.startswith("### s")


def test_script_reads_the_logical_path_of_a_committed_result(tmp_path):
    """evaluate-real commits results/real-eval/ as a version under _v/<id>/ (hsissl.storage.commit):
    the path the README names does not exist as a file, yet the script reads it."""
    from hsissl.storage import open_storage

    store = open_storage(tmp_path / "artifacts")
    with store.transaction("results/real-eval") as tx:
        tx.commit({"metrics.json": json.dumps({"kind": "real-eval", "rows": ROWS}).encode()})
    logical = tmp_path / "artifacts" / "results" / "real-eval" / "metrics.json"
    assert not logical.exists()
    done = _script(logical, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "| MAE + probe | 56.3 ± 7.4 |" in done.stdout
    done = _script(logical.with_name("tables.json"), cwd=tmp_path)  # not in the committed version
    assert done.returncode == 2 and "tables.json: not a readable JSON file" in done.stderr


def test_script_refuses_bad_inputs_and_leaves_the_file_alone(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(f"{BEGIN}\nkeep\n{END}\n")
    (tmp_path / "other.json").write_text(json.dumps({"kind": "finetune"}))
    (tmp_path / "a.json").write_text(json.dumps({"kind": "real-eval", "rows": ROWS}))
    for args, problem in (
        (["other.json"], "other.json: kind is not 'real-eval'"),
        (["missing.json"], "missing.json: not a readable JSON file"),
        (["a.json", "a.json"], "seed 0 is also in"),
    ):
        done = _script(*args, "--write", doc, cwd=tmp_path)
        assert done.returncode == 2 and problem in done.stderr, done.stderr
    assert doc.read_text() == f"{BEGIN}\nkeep\n{END}\n"
    (tmp_path / "plain.md").write_text("no markers\n")
    done = _script("a.json", "--write", "plain.md", cwd=tmp_path)
    assert done.returncode == 2 and "plain.md: expected one" in done.stderr
