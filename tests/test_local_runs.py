"""``hsissl-pipeline`` without running stages: which local run a run folder resolves to, what a
rerun takes from a record, pipeline parameters checked before anything runs, user errors as
exit 2 with one line, and the compile flags for the chart's object names.

Records are written by hand (or by ``execute`` with a stand-in pipeline), so no test here waits
for kfp.local to run a stage."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from components.options import PipelineOptions
from hsissl.layout import PIPELINE_RUNS
from pipelines import cli, local
from pipelines.dag import build_pipeline
from pipelines.local import (
    LATEST,
    LocalRun,
    ParameterError,
    RunRecordError,
    load_run,
    rerun_local,
)

REPO = Path(__file__).resolve().parents[1]
STORE = "file:///store"


def _task(**outputs: str) -> dict[str, Any]:
    """A task's record: each output points at ``STORE/<uri>``."""
    artifacts = {n: {"uri": f"/kfp/{n}", "metadata": {"uri": f"{STORE}/{u}"}} for n, u in outputs.items()}  # fmt: skip
    return {"parameters": {}, "artifacts": artifacts}


FULL_TASKS = {
    "open-lineage": _task(),
    "ingest": _task(dataset="datasets/whu"),
    "pretrain-mae": _task(encoder="ckpt/mae-full/encoder.pt"),
    "pretrain-dinov2": _task(encoder="ckpt/dinov2-full/encoder.pt"),
    "for-loop-3-iteration-0/finetune-heads": _task(results="results/finetune-mae-linear"),
}
RERUN_TASKS = {
    "open-lineage": _task(),
    "dataset-ref": _task(dataset="datasets/whu"),
    "pretrain-mae": _task(encoder="ckpt/mae-rerun/encoder.pt"),
    "close-lineage": _task(),
}


def _write(run_dir: Path, run_id: str, pipeline: str, tasks: dict, status: str = "SUCCEEDED",
           **arguments: Any) -> Path:  # fmt: skip
    """A run record as ``execute`` writes it; returns its folder."""
    folder = run_dir / PIPELINE_RUNS / run_id
    folder.mkdir(parents=True)
    args = {"preset": "", "overrides": [f"run_dir={run_dir}"], "storage_uri": STORE,
            "tracking_uri": "sqlite:///x.db"} | arguments  # fmt: skip
    run = LocalRun(run_id, pipeline, str(folder), args, status=status, tasks=tasks)
    (folder / "run.json").write_text(json.dumps(asdict(run)))
    return folder


@pytest.fixture
def staged(monkeypatch) -> list[tuple[str, dict]]:
    """What rerun_local asks run_stage_local to run, instead of running it."""
    calls: list[tuple[str, dict]] = []

    def record(stage: str, arguments: dict, **_: Any) -> str:
        calls.append((stage, arguments))
        return "ran"

    monkeypatch.setattr(local, "run_stage_local", record)
    return calls


# -- which run a run folder resolves to ---------------------------------------------------


class _StandIn:
    """A pipeline function for ``execute``: its name, its parameters, a call that may fail."""

    def __init__(self, name: str, fail: bool = False) -> None:
        self.name, self.fail = name, fail
        kinds = {"preset": "String", "overrides": "List", "storage_uri": "String",
                 "tracking_uri": "String"}  # fmt: skip
        inputs = {k: SimpleNamespace(type=t) for k, t in kinds.items()}
        self.component_spec = SimpleNamespace(inputs=inputs)

    def __call__(self, **_: Any) -> None:
        if self.fail:
            raise RuntimeError("a task failed")


def _execute(monkeypatch, run_dir: Path, name: str, tasks: dict, fail: bool = False) -> LocalRun:
    """``local.execute`` with a stand-in pipeline whose tasks left ``tasks``."""
    monkeypatch.setattr(local, "_collect_outputs", lambda *_: tasks)
    monkeypatch.setattr(local, "_parent_run", lambda *_: None)
    arguments = {"preset": "", "overrides": [f"run_dir={run_dir}"], "storage_uri": STORE,
                 "tracking_uri": "sqlite:///x.db"}  # fmt: skip
    return local.execute(_StandIn(name, fail), arguments, check=False)


def test_latest_names_the_newest_full_run_with_a_dataset_not_reruns_or_failures(
    tmp_path: Path, monkeypatch
) -> None:
    full = _execute(monkeypatch, tmp_path, "hsissl", FULL_TASKS)
    assert (tmp_path / PIPELINE_RUNS / LATEST).read_text() == full.run_id
    rerun = _execute(monkeypatch, tmp_path, "hsissl-pretrain-mae", RERUN_TASKS)
    failed = _execute(monkeypatch, tmp_path, "hsissl", {}, fail=True)  # before ingest finished
    assert (rerun.status, failed.status) == ("SUCCEEDED", "FAILED")
    assert load_run(tmp_path).run_id == full.run_id
    assert load_run(tmp_path / PIPELINE_RUNS).run_id == full.run_id
    assert load_run(rerun.record_dir).run_id == rerun.run_id  # a record folder is itself
    # a full run that failed after ingest still has a dataset to rerun on: it is the newest
    later = _execute(monkeypatch, tmp_path, "hsissl", {"ingest": FULL_TASKS["ingest"]}, fail=True)
    assert load_run(tmp_path).run_id == later.run_id


def test_rerun_after_a_rerun_and_a_failed_run_uses_the_full_runs_artifacts(
    tmp_path: Path, staged: list
) -> None:
    """The audit's sequence: rerun pretrain-mae, a failed run-local, then finetune dinov2."""
    _write(tmp_path, "local-1", "hsissl", FULL_TASKS)
    (tmp_path / PIPELINE_RUNS / LATEST).write_text("local-1")
    _write(tmp_path, "local-2", "hsissl-pretrain-mae", RERUN_TASKS)
    _write(tmp_path, "local-3", "hsissl", {}, status="FAILED")
    rerun_local("finetune-heads", tmp_path, ["finetune.loss=focal"], encoder="dinov2", head="conv")
    ((stage, arguments),) = staged
    assert stage == "finetune-heads"
    assert arguments["dataset_uri"] == f"{STORE}/datasets/whu"
    assert arguments["encoder_uri"] == f"{STORE}/ckpt/dinov2-full/encoder.pt"
    assert arguments["overrides"][-1] == "finetune.loss=focal" and arguments["head"] == "conv"


def test_a_rerun_record_gives_its_referenced_dataset_and_its_own_encoder(
    tmp_path: Path, staged: list
) -> None:
    folder = _write(tmp_path, "local-2", "hsissl-pretrain-mae", RERUN_TASKS)
    rerun_local("finetune-heads", folder / "run.json", [], encoder="mae")
    rerun_local("pca-poc", folder, [])
    (_, finetune), (_, pca) = staged
    assert finetune["encoder_uri"] == f"{STORE}/ckpt/mae-rerun/encoder.pt"
    assert finetune["dataset_uri"] == pca["dataset_uri"] == f"{STORE}/datasets/whu"


def test_random_control_needs_no_pretraining_in_the_record(tmp_path: Path, staged: list) -> None:
    folder = _write(tmp_path, "local-2", "hsissl-pretrain-mae", RERUN_TASKS)
    rerun_local("finetune-heads", folder, [], encoder="random")
    full = _write(tmp_path, "local-1", "hsissl", FULL_TASKS, control_encoder="random:tiny_vit")
    rerun_local("finetune-heads", full, [], encoder="random")
    assert [args["encoder_uri"] for _, args in staged] == ["random", "random:tiny_vit"]


def test_records_without_what_a_rerun_needs_are_named_in_the_error(
    tmp_path: Path, staged: list
) -> None:
    rerun = _write(tmp_path, "local-2", "hsissl-pretrain-mae", RERUN_TASKS)
    with pytest.raises(RunRecordError, match=r"local-2/run.json \(pipeline hsissl-pretrain-mae, "
                       r"SUCCEEDED\): no dinov2 encoder: no task 'pretrain-dinov2'"):  # fmt: skip
        rerun_local("finetune-heads", rerun, [], encoder="dinov2")
    failed = _write(tmp_path, "local-3", "hsissl", {}, status="FAILED")
    with pytest.raises(RunRecordError, match=r"local-3/run.json .*FAILED\): no dataset: no task "
                       r"ingest or dataset-ref with output 'dataset' \(tasks: \[\]\)"):  # fmt: skip
        rerun_local("pretrain-mae", failed, [])
    assert staged == []
    with pytest.raises(FileNotFoundError, match=f"{PIPELINE_RUNS}/{LATEST}"):
        load_run(tmp_path)  # records, but none that latest names
    (tmp_path / PIPELINE_RUNS / LATEST).write_text("local-9")
    with pytest.raises(FileNotFoundError, match="local-9/run.json is missing"):
        load_run(tmp_path)


def test_rerun_cli_reports_an_unusable_record_as_one_line(tmp_path: Path, capsys) -> None:
    failed = _write(tmp_path, "local-3", "hsissl", {}, status="FAILED")
    code = cli.main(["rerun", "--stage", "pretrain-mae", "--from-run", str(failed)])
    err = capsys.readouterr().err
    assert code == 2 and "no dataset" in err and "local-3" in err and "Traceback" not in err


# -- pipeline parameters -----------------------------------------------------------------


def test_unknown_or_mistyped_parameters_stop_run_local_before_any_record(
    tmp_path: Path, capsys
) -> None:
    run_dir = tmp_path / "run"
    base = ["run-local", "--config", str(REPO / "configs" / "tiny.yaml")]
    for param, expected in (("bogus=1", "unknown parameter(s) ['bogus']; valid: source (String)"),
                            ("gpus=two", "gpus is of type Integer"),
                            ("run_mae=1", "'run_mae' is of type Boolean, got 1 (int)")):  # fmt: skip
        assert cli.main([*base, "--param", param, f"run_dir={run_dir}"]) == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and len(err.splitlines()) == 1, err
    assert not run_dir.exists()
    with pytest.raises(ParameterError, match="'bogus'"):  # the library checks too
        local.run_local(REPO / "configs" / "tiny.yaml", [f"run_dir={run_dir}"],
                        parameters={"bogus": 1})  # fmt: skip
    assert not (run_dir / PIPELINE_RUNS).exists()  # (local_arguments made the run folder)


def test_param_values_are_typed_by_the_pipelines_parameters() -> None:
    pairs = [("source", "123"), ("run_ssvit", "false"), ("heads", '["linear"]'),
             ("pretrain_epochs", "1"), ("gpus", "2"), ("control_encoder", "random:x")]  # fmt: skip
    assert cli.pipeline_parameters(build_pipeline(), pairs) == {
        "source": "123", "run_ssvit": False, "heads": ["linear"], "pretrain_epochs": 1,
        "gpus": 2, "control_encoder": "random:x"}  # fmt: skip
    with pytest.raises(ParameterError, match="'heads' is of type List"):
        cli.pipeline_parameters(build_pipeline(), [("heads", '"linear"')])


def test_submit_rejects_unknown_parameters_before_connecting(tmp_path: Path, capsys) -> None:
    package = tmp_path / "p.yaml"  # the parameters of a given package are its own
    assert cli.main(["compile", "-o", str(package)]) == 0
    for extra in ([], ["--package", str(package)]):
        # port 9 (discard) is never a KFP host: reaching connect() would fail differently
        code = cli.main(["submit", "--host", "http://127.0.0.1:9", *extra, "--param", "bogus=1"])
        assert code == 2 and "unknown parameter(s) ['bogus']" in capsys.readouterr().err


# -- user errors -------------------------------------------------------------------------


def test_pytorchjob_name_that_kubernetes_rejects_is_one_line_exit_2(capsys) -> None:
    base = ["pytorchjob", "--stage", "pretrain-mae", "--nodes", "2"]
    assert cli.main([*base, "--name", "Bad_Name"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hsissl-pipeline pytorchjob: error: --name 'Bad_Name'")
    assert "lowercase RFC 1123" in err and len(err.splitlines()) == 1
    assert cli.main([*base, "--name", "ok", "mae.typo=1"]) == 2  # a ConfigError
    err = capsys.readouterr().err.strip()
    assert "mae.typo" in err and len(err.splitlines()) == 1


def test_schema_errors_name_the_field_and_bugs_keep_their_traceback(monkeypatch) -> None:
    import jsonschema

    from components.jobs.pytorchjob import build_pytorchjob, validate

    job = build_pytorchjob("pretrain-mae", [], nodes=2, gpus_per_node=1, name="x")
    job["spec"]["pytorchReplicaSpecs"]["Worker"]["restartPolicy"] = "Sometimes"
    with pytest.raises(jsonschema.ValidationError) as caught:
        validate(job)
    message = cli._user_error(caught.value)
    assert message.startswith("spec.pytorchReplicaSpecs.Worker.restartPolicy: 'Sometimes'")

    def broken(_args) -> int:
        raise RuntimeError("a bug")

    monkeypatch.setitem(cli.COMMANDS, "compile", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["compile"])


# -- compile flags for the chart's object names ------------------------------------------


def test_compile_flags_name_the_configmaps_and_the_pytorchjob_service_account(
    tmp_path: Path,
) -> None:
    out = tmp_path / "ml.yaml"
    assert cli.main(["compile", "-o", str(out), "--env-config-map", "ml-hsissl-pipeline-env",
                     "--config-map", "ml-hsissl-pipeline-config",
                     "--pytorchjob-service-account", "ml-hsissl-pipeline"]) == 0  # fmt: skip
    spec, platform = yaml.safe_load_all(out.read_text())
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    env_maps = {m["configMapName"] for e in executors.values() for m in e["configMapAsEnv"]}
    volumes = {m["configMapName"] for e in executors.values() for m in e["configMapAsVolume"]}
    assert (env_maps, volumes) == ({"ml-hsissl-pipeline-env"}, {"ml-hsissl-pipeline-config"})
    text = out.read_text()
    assert "hsissl-pipeline-env" not in text.replace("ml-hsissl-pipeline-env", "")
    launcher_options = [
        json.loads(p["runtimeValue"]["constant"])
        for c in spec["components"].values()
        for t in c.get("dag", {}).get("tasks", {}).values()
        for n, p in t.get("inputs", {}).get("parameters", {}).items()
        if n == "options"
    ]
    assert launcher_options and all(
        (o["pytorchjob_service_account"], o["env_config_map"], o["config_map"])
        == ("ml-hsissl-pipeline", "ml-hsissl-pipeline-env", "ml-hsissl-pipeline-config")
        for o in launcher_options
    )


def test_pytorchjob_pods_follow_the_runs_service_account_unless_told(tmp_path: Path) -> None:
    parser = cli.build_parser()

    def job_account(*argv: str) -> str:
        return cli.options_from(parser.parse_args(list(argv))).pytorchjob_service_account

    default = PipelineOptions().pytorchjob_service_account
    assert job_account("upload", "--host", "h", "--version", "v") == default
    assert job_account("submit", "--host", "h", "--service-account", "ml-sa") == "ml-sa"
    assert job_account("submit", "--host", "h", "--service-account", "ml-sa",
                       "--pytorchjob-service-account", "jobs") == "jobs"  # fmt: skip
    assert job_account("rerun", "--stage", "report", "--from-run", "r") == default
    assert job_account("pytorchjob", "--stage", "pretrain-mae", "--nodes", "2", "--name", "x",
                       "--service-account", "ml-sa") == "ml-sa"  # fmt: skip
