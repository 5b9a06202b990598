"""Typed stage results: the main output as ``uri``, and the CLI's JSON as the dicts printed before."""

import json

from hsissl import cli
from hsissl.stages import results as r


def test_each_result_names_its_main_output():
    assert r.IngestResult("s3://b/datasets/d", {}, False).uri == "s3://b/datasets/d"
    assert r.PretrainResult("s3://b/checkpoints/m/encoder.pt").uri.endswith("encoder.pt")
    assert (
        r.FinetuneResult("ft", "s3://b/results/ft", "h", 0.5, 0.4, 1.0).uri == "s3://b/results/ft"
    )
    assert r.BaselineResult("bl", "s3://b/results/bl", "m", 3, 0.5, 0.4, 1.0).uri.endswith("bl")
    assert r.PCAResult("s3://b/results/pca", [0.9], {"pca": 0.1}).uri.endswith("pca")
    assert r.ReportResult("h.html", "s.md", [], [], {}, [], [], 1.0).uri == "h.html"
    assert r.EvaluateRealResult("s3://b/results/real", "t", "ts").uri.endswith("real")
    assert r.ConvertResult("/data/out", "tr", {}, "hsissl ingest").uri == "/data/out"
    assert r.SyntheticResult("/run/synthetic", {"tr": 2}, 64).uri == "/run/synthetic"


def test_the_cli_prints_the_fields_in_order_without_the_manifest(capsys):
    result = r.IngestResult("s3://b/datasets/d", {"splits": {}}, reused=True)
    assert cli._print_result("ingest", result) == 0
    assert capsys.readouterr().out == json.dumps({"dataset_uri": "s3://b/datasets/d",
                                                  "reused": True}, indent=1) + "\n"  # fmt: skip
    finetune = r.FinetuneResult("ft", "u", "u/head.pt", 0.5, None, 2.0)
    assert list(finetune.to_dict()) == ["name", "results_uri", "head_uri", "tile_miou",
                                        "scene_miou", "seconds"]  # fmt: skip


def test_a_report_with_problems_exits_2_naming_each(capsys):
    result = r.ReportResult("h", "m", [], [], {}, [], ["no dataset manifest"], 0.1)
    assert cli._print_result("report", result) == 2
    assert capsys.readouterr().err == "hsissl report: error: no dataset manifest\n"


def test_ingest_check_lists_violations(capsys):
    assert cli._print_result("ingest", r.IngestCheck(["a.tif: bad"], "/src", {})) == 2
    assert capsys.readouterr().out == "a.tif: bad\n1 violation(s) in /src\n"
