"""Regenerate the evaluate-real table in a Markdown file from the run's output, not by hand.

    .venv/bin/python scripts/real_table.py runs/real/artifacts/results/real-eval/metrics.json \
        [more metrics.json ...] [--write docs/real-data.md]

Reads each ``metrics.json`` written by ``hsissl evaluate-real`` (e.g. one per scene when the
scenes ran in separate processes), merges their per-seed rows, and prints the per-scene tables
(``hsissl.report.real_table``: mean ± std over seeds, paired differences to the better floor and
to the random-init control). With ``--write FILE`` the text between the lines
``<!-- real-table:begin -->`` and ``<!-- real-table:end -->`` of FILE is replaced instead
(FILE is left untouched when anything is wrong). Exit 2 on a bad input, naming the file.

A path inside a committed result folder (``results/real-eval/metrics.json``: the file lives under
``_v/<version>/``, named by the folder's ``_current.json``) is read from the current version, as
hsissl reads it; the versioned path works as well.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hsissl.report.real_table import REAL_KIND, markdown, replace_block, scene_tables
from hsissl.storage import open_storage
from hsissl.storage.commit import POINTER


def read_text(path: Path) -> str:
    """The file at ``path``, or, inside a committed folder, its current version's copy."""
    if path.exists():
        return path.read_text()
    for folder in path.absolute().parents:
        if (folder / POINTER).is_file():
            return (
                open_storage(folder)
                .get_bytes(path.absolute().relative_to(folder).as_posix())
                .decode()
            )
    raise FileNotFoundError(f"no such file, and no {POINTER} of a committed folder above it")


def load_rows(paths: list[Path]) -> tuple[list[dict], dict | None]:
    """The rows of every file, and their pretraining data when all files that state it agree."""
    rows: list[dict] = []
    data: list[dict] = []
    seen: dict[tuple, Path] = {}
    for path in paths:
        try:
            metrics = json.loads(read_text(path))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: not a readable JSON file ({exc})") from exc
        if not isinstance(metrics, dict) or metrics.get("kind") != REAL_KIND:
            raise ValueError(f"{path}: kind is not {REAL_KIND!r}; expected the metrics.json "
                             "of hsissl evaluate-real")  # fmt: skip
        data += [metrics["pretraining"]] if metrics.get("pretraining") else []
        for row in metrics.get("rows") or []:
            key = (row["scene"], row["protocol"], row["seed"])
            if key in seen:
                raise ValueError(f"{path}: scene {key[0]!r}, {key[1]}, seed {key[2]} is also "
                                 f"in {seen[key]}")  # fmt: skip
            seen[key] = path
            rows.append(row)
    if not rows:
        raise ValueError(f"no rows in {', '.join(map(str, paths))}")
    return rows, data[0] if data and all(d == data[0] for d in data) else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])  # fmt: skip
    parser.add_argument("metrics", nargs="+", type=Path, help="evaluate-real metrics.json files")
    parser.add_argument("--write", type=Path, help="Markdown file whose marked block to replace")
    args = parser.parse_args(argv)
    try:
        rows, pretraining = load_rows(args.metrics)
        table = markdown(scene_tables(rows), pretraining)
        if args.write is None:
            print(table, end="")
            return 0
        text = replace_block(args.write.read_text(), table, str(args.write))
    except (OSError, ValueError, KeyError) as exc:
        print(f"real_table: {exc}", file=sys.stderr)
        return 2
    args.write.write_text(text)
    print(f"real_table: wrote the table of {len(args.metrics)} file(s) into {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
