"""``hsissl.layout`` is the one owner of the store's paths: what it builds, and that nothing
else in src/, components/ or pipelines/ builds them."""

import ast
import re
from pathlib import Path

import pytest

from hsissl import layout
from hsissl.config import load_config

REPO = Path(__file__).resolve().parents[1]
PREFIXES = (layout.DATASETS, layout.CHECKPOINTS, layout.RESULTS, layout.REPORTS,
            layout.PIPELINE_RUNS)  # fmt: skip
# A path being built: a prefix followed by a formatted value ("results/{}"), after one
# ("{}/reports"), or ending a string ("/datasets/", for rpartition); and the runs folder.
# "results/<name>" in a message documents the layout and is fine.
_P = "|".join(map(re.escape, PREFIXES))
BUILT = re.compile(
    rf"(?:^|[^\w<-])(?:{_P})(?:/\{{\}}|/$)|\{{\}}/(?:{_P})\b|^{layout.PIPELINE_RUNS}$"
)


def test_store_keys():
    assert layout.dataset_key("whu-ohs") == "datasets/whu-ohs"
    assert layout.checkpoint_key("mae-r1") == "checkpoints/mae-r1"
    assert layout.checkpoint_key("mae-r1", layout.ENCODER) == "checkpoints/mae-r1/encoder.pt"
    assert layout.checkpoint_key("m", layout.TRAIN_STATE) == "checkpoints/m/train.pt"
    assert layout.checkpoint_key("m", layout.HISTORY) == "checkpoints/m/history.json"
    assert layout.result_key("ft", layout.METRICS) == "results/ft/metrics.json"
    assert layout.result_key("ft", layout.PREDICTIONS) == "results/ft/predictions.npz"
    assert layout.report_key("report", layout.REPORT_HTML) == "reports/report/report.html"
    assert layout.report_key("report", layout.REPORT_MARKDOWN) == "reports/report/summary.md"
    assert layout.folder_name("results/ft/metrics.json", layout.RESULTS) == "ft"
    assert layout.folder_name("results/ft/x/metrics.json", layout.RESULTS) is None
    assert layout.folder_name("checkpoints/m/encoder.pt", layout.RESULTS) is None


def test_checkpoint_names_per_pipeline_run():
    assert layout.checkpoint_name("mae", "", "run-1") == "mae-run-1"
    assert layout.checkpoint_name("mae", "line", "run-1") == "mae-line"  # pretrain.name wins
    assert layout.checkpoint_name("dinov2", "", "") == "dinov2"


def test_run_folder_and_store_of_a_config(tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", "data.name=mine"])
    assert layout.run_dir_of(cfg) == tmp_path / "run" and (tmp_path / "run").is_dir()
    store = layout.storage_of(cfg)
    assert (
        store.join("x") == store.join("x")
        and layout.default_store(tmp_path / "run").name == "artifacts"
    )
    uri = layout.dataset_uri(cfg)
    assert uri == store.join("datasets/mine")
    assert layout.split_dataset_uri(uri) == (store.join("").rstrip("/"), "mine")
    assert layout.pipeline_runs(tmp_path) == tmp_path / "pipeline-runs"


@pytest.mark.parametrize(
    "uri", ["s3://b/store/results/x", "s3://b/store/datasets/", "s3://b/datasets/a/b"]
)
def test_a_uri_that_is_not_a_dataset_is_refused(uri):
    with pytest.raises(ValueError, match="expected <artifact store>/datasets/<name>"):
        layout.split_dataset_uri(uri)


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def _strings(path: Path) -> list[tuple[int, str]]:
    """Every string literal of a module but its docstrings; an f-string with ``{}`` for each
    formatted value."""
    tree = ast.parse(path.read_text())
    skip, out = _docstrings(tree), []
    inner = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
            out.append((node.lineno, text))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if id(node) not in skip and id(node) not in inner:
                out.append((node.lineno, node.value))
    return out


def test_the_detector_sees_paths_being_built():
    hits = [t for t in ("results/{}", "{}/checkpoints/{}/encoder.pt", "/datasets/", "{}/reports",
                        "pipeline-runs") if BUILT.search(t)]  # fmt: skip
    assert len(hits) == 5
    assert not [t for t in ("results/<name>", "`results/`, `checkpoints/`", "history.json",
                            "see the results", "finetune-results/{}") if BUILT.search(t)]  # fmt: skip


def test_no_other_module_builds_store_paths():
    sources = [p for d in ("src", "components", "pipelines") for p in (REPO / d).rglob("*.py")]
    assert len(sources) > 50
    offenders = [
        f"{path.relative_to(REPO)}:{line}: {text!r}"
        for path in sources
        if path.name != "layout.py"
        for line, text in _strings(path)
        if BUILT.search(text)
    ]
    assert offenders == []
