"""Exit codes and one-line messages of ``hsissl <stage>`` (0 ok, 1 unexpected, 2 bad input, 130).

Stage modules are monkeypatched: these tests check the CLI's mapping, not the stages.
"""

import importlib

import pytest

from hsissl import cli
from hsissl.stages.results import FinetuneResult


def patch_stage(monkeypatch: pytest.MonkeyPatch, stage: str, exc: BaseException) -> None:
    """Make ``hsissl <stage>`` raise ``exc`` from inside its ``run``."""
    module = importlib.import_module(f"hsissl.stages.{cli.stages()[stage][0]}")

    def run(cfg, **kwargs):
        raise exc

    monkeypatch.setattr(module, "run", run)


def test_ctrl_c_in_pretraining_is_one_line_with_a_resume_hint(monkeypatch, capsys, tmp_path):
    patch_stage(monkeypatch, "pretrain-mae", KeyboardInterrupt())
    assert cli.main(["pretrain-mae", f"run_dir={tmp_path}"]) == 130
    err = capsys.readouterr().err
    assert err == (
        "hsissl pretrain-mae: interrupted; rerun the same command to resume from the last "
        "checkpoint\n"
    )


def test_ctrl_c_in_other_stages_has_no_resume_hint(monkeypatch, capsys, tmp_path):
    patch_stage(monkeypatch, "ingest", KeyboardInterrupt())
    assert cli.main(["ingest", f"run_dir={tmp_path}"]) == 130
    assert capsys.readouterr().err == "hsissl ingest: interrupted\n"


def test_ctrl_c_with_debug_re_raises(monkeypatch, tmp_path):
    patch_stage(monkeypatch, "pretrain-dinov2", KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        cli.main(["--debug", "pretrain-dinov2", f"run_dir={tmp_path}"])


def test_a_missing_input_file_is_invalid_input(monkeypatch, capsys, tmp_path):
    missing = FileNotFoundError(f"encoder record {tmp_path}/encoder.pt does not exist")
    patch_stage(monkeypatch, "finetune", missing)
    assert cli.main(["finetune", f"run_dir={tmp_path}"]) == 2
    assert capsys.readouterr().err == f"hsissl finetune: error: {missing}\n"


def test_other_errors_stay_unexpected(monkeypatch, capsys, tmp_path):
    patch_stage(monkeypatch, "report", RuntimeError("boom"))
    assert cli.main(["report", f"run_dir={tmp_path}"]) == 1
    assert "hsissl report: failed: RuntimeError: boom" in capsys.readouterr().err


def test_bad_yaml_in_the_config_file_is_exit_2_naming_file_and_line(capsys, tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text("data:\n  tile_size: [64")
    assert cli.main(["ingest", "--config", str(preset)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hsissl ingest: error: {preset}:2:17: not valid YAML")
    assert "ScannerError" not in err and "ParserError" not in err


def test_a_directory_as_config_is_exit_2(capsys, tmp_path):
    assert cli.main(["ingest", "--config", str(tmp_path)]) == 2
    assert "is a directory, not a YAML file" in capsys.readouterr().err


def test_a_value_outside_its_allowed_set_is_exit_2_naming_the_key(capsys):
    assert cli.main(["pretrain-mae", "pretrain.device=gpu"]) == 2
    err = capsys.readouterr().err
    assert "hsissl pretrain-mae: error: command line: config key pretrain.device='gpu'" in err


def test_report_with_missing_inputs_is_written_but_exits_2(tmp_path, capsys):
    rc = cli.main(["report", f"run_dir={tmp_path}", "tracking.uri=", "report.results=[nope]"])
    err = capsys.readouterr().err
    assert rc == 2 and "hsissl report: error: report.results names ['nope']" in err
    assert list(tmp_path.rglob("report.html"))  # the page exists all the same


def test_overrides_may_follow_flags(monkeypatch, tmp_path):
    seen = {}
    module = importlib.import_module("hsissl.stages.finetune")
    done = FinetuneResult("x", "results/x", "results/x/head.pt", None, None, 0.0)
    monkeypatch.setattr(module, "run", lambda cfg, **kw: seen.setdefault("cfg", cfg) and done)
    argv = ["finetune", f"run_dir={tmp_path}", "--head", "conv", "finetune.max_steps=5",
            "--encoder", "random:vit_tiny_patch8_64", "finetune.lr=0.01"]  # fmt: skip
    assert cli.main(argv) == 0
    ft = seen["cfg"].finetune
    assert (ft.head, ft.max_steps, ft.lr) == ("conv", 5, 0.01)
    assert ft.encoder == "random:vit_tiny_patch8_64"
    with pytest.raises(SystemExit):  # a flag it does not know is still an error
        cli.main(["finetune", "--heads", "conv"])


def test_an_unusable_store_exits_2_naming_it(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("HSISSL_S3_ENDPOINT", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("MLFLOW_S3_ENDPOINT_URL", raising=False)
    rc = cli.main(["ingest", f"run_dir={tmp_path}", "storage.uri=s3://bucket/p", "tracking.uri="])
    assert rc == 2 and "hsissl ingest: error: S3 endpoint not configured" in capsys.readouterr().err
