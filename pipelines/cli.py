"""``hsissl-pipeline``: compile, run locally, rerun a stage, submit/upload to KFP, PyTorchJob.

hsissl-pipeline compile                                  # -> pipelines/hsissl.yaml
hsissl-pipeline run-local --config configs/tiny.yaml [KEY=VALUE ...]
hsissl-pipeline rerun --stage pretrain-mae --from-run runs/tiny [KEY=VALUE ...]
hsissl-pipeline submit --host http://localhost:8080 --experiment hsissl [KEY=VALUE ...]
hsissl-pipeline rerun --stage finetune-heads --from-run <KFP run id> --host URL --encoder mae
hsissl-pipeline upload --host URL --version $(git rev-parse HEAD)
hsissl-pipeline pytorchjob --stage pretrain-mae --nodes 4 --gpus-per-node 8 --name mae-4x8
hsissl-pipeline trainjob --stage pretrain-mae --nodes 4 --gpus-per-node 8 --name mae-4x8
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from components.options import PipelineOptions
from hsissl import methods
from pipelines.backend import MIN_BACKEND, version_text
from pipelines.compile import GOLDEN, add_options, compile_pipeline, options_from
from pipelines.dag import PIPELINE_NAME, stage_names


def _param(text: str) -> tuple[str, str]:
    """``name=value``; the value is parsed once the parameter's type is known."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=VALUE")
    return key, raw


def pipeline_parameters(pipeline: Any, pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """``--param`` values typed by ``pipeline``'s parameters: String as written, the others as
    JSON (false, 3, 0.5, ["linear"]); unknown names and wrong types raise ParameterError."""
    from pipelines.local import ParameterError, check_arguments

    inputs = pipeline.component_spec.inputs or {}
    arguments: dict[str, Any] = {}
    for name, raw in pairs:
        kind = inputs[name].type if name in inputs else "String"  # unknown: check_arguments
        try:
            arguments[name] = raw if kind == "String" else json.loads(raw)
        except json.JSONDecodeError:
            raise ParameterError(f"--param {name}={raw}: {name} is of type {kind}, written as JSON "
                                 "(true, 3, 0.5, [\"linear\"])") from None  # fmt: skip
    check_arguments(pipeline, arguments)
    return arguments


def _stages(text: str) -> list[str]:
    stages = [s for s in text.split(",") if s]
    unknown = [s for s in stages if s not in stage_names()]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown stage(s) {unknown}; expected some of {list(stage_names())}"
        )
    return stages


def _overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")


def _remote(p: argparse.ArgumentParser, host_required: bool) -> None:
    p.add_argument(
        "--host", required=host_required, help="KFP API endpoint, e.g. http://localhost:8080"
    )
    p.add_argument("--namespace", help="KFP namespace (multi-user installs)")
    p.add_argument("--token", help="bearer token (default $KFP_TOKEN)")
    p.add_argument(
        "--experiment", default=PIPELINE_NAME, help="KFP experiment (default %(default)s)"
    )
    p.add_argument(
        "--service-account",
        default="hsissl-pipeline",
        help="service account of the run's pods (default %(default)s, from the chart)",
    )
    _version_check(p)


def _version_check(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--skip-version-check",
        action="store_true",
        help=f"do not refuse a KFP server older than {version_text(MIN_BACKEND)} (the version "
        "it reports at /apis/v2beta1/healthz; one reporting none is only warned about)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hsissl-pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("compile", help="compile the pipeline to IR YAML (make pipeline)")
    p.add_argument("--output", "-o", type=Path, default=GOLDEN, help="default %(default)s")
    p.add_argument(
        "--stage", choices=stage_names(), help="compile the one-stage rerun pipeline instead"
    )
    add_options(p)

    p = sub.add_parser("run-local", help="run the DAG here under kfp.local (make run)")
    p.add_argument("--config", type=Path, help="config preset (configs/tiny.yaml)")
    p.add_argument(
        "--stages",
        type=_stages,
        default=list(stage_names()),
        help="comma-separated sub-DAG (ingest always runs); default: all",
    )
    p.add_argument(
        "--param",
        action="append",
        type=_param,
        default=[],
        metavar="NAME=VALUE",
        help="pipeline parameter, e.g. run_ssvit=false or heads='[\"linear\"]'",
    )
    p.add_argument("--run-id", help="local run id (default: a new local-… id)")
    p.add_argument(
        "--cache",
        action="store_true",
        help="reuse outputs of cached tasks from earlier local runs (as KFP would)",
    )
    _overrides(p)

    p = sub.add_parser("run-stage", help="run one stage here on artifacts already in the store")
    p.add_argument("stage", choices=stage_names())
    p.add_argument("--config", type=Path, help="config preset")
    p.add_argument("--dataset-uri", default="", help="default: <storage>/datasets/<data.name>")
    p.add_argument(
        "--encoder-uri",
        default="",
        help="finetune-heads: encoder record, models:/<name>/<version>, models:/<name>@<alias> "
        "(MLflow Model Registry) or random:<factory>",
    )
    p.add_argument("--head", default="", help="finetune-heads: linear | conv | segmenter")
    p.add_argument("--run-id", help="pipeline run id; the same id resumes the same checkpoints")
    _overrides(p)

    p = sub.add_parser("rerun", help="rerun one stage of an earlier run on its artifacts")
    p.add_argument("--stage", required=True, choices=stage_names())
    p.add_argument(
        "--from-run",
        required=True,
        help="a local run (record folder, run.json, or run folder = its latest run) "
        "or, with --host, a KFP run id",
    )
    p.add_argument(
        "--encoder",
        default="mae",
        choices=[*methods.names(), "random"],
        help="finetune-heads: whose encoder (default %(default)s)",
    )
    p.add_argument("--head", default="", help="finetune-heads: head ('' = the config's)")
    p.add_argument("--run-id", help="local: id of this rerun; an interrupted one resumes with it")
    _remote(p, host_required=False)
    add_options(p)
    _overrides(p)

    p = sub.add_parser("submit", help="submit a run of the pipeline to a KFP host")
    _remote(p, host_required=True)
    p.add_argument("--run-name", help="default: hsissl <date>")
    p.add_argument(
        "--config",
        default=PipelineOptions().default_preset,
        help="preset path in the pods (default %(default)s, from the chart's ConfigMap)",
    )
    p.add_argument(
        "--param",
        action="append",
        type=_param,
        default=[],
        metavar="NAME=VALUE",
        help="pipeline parameter, e.g. source=/data/WHU-OHS or gpus=2",
    )
    p.add_argument("--package", type=Path, help="a compiled YAML (default: compile now)")
    add_options(p)
    _overrides(p)

    p = sub.add_parser("upload", help="upload the compiled pipeline as a new version (CI)")
    p.add_argument("--host", required=True)
    p.add_argument("--namespace")
    p.add_argument("--token")
    p.add_argument("--version", required=True, help="version name, e.g. the git SHA")
    p.add_argument("--pipeline", default=PIPELINE_NAME, help="pipeline name (default %(default)s)")
    p.add_argument("--package", type=Path, help="a compiled YAML (default: compile now)")
    _version_check(p)
    p.add_argument("--skip-existing", action="store_true",
                   help="do nothing if the pipeline has a version of that name (KFP would reject "
                        "a duplicate)")  # fmt: skip
    add_options(p)

    for command, what in (("pytorchjob", "Training Operator v1 PyTorchJob"),
                          ("trainjob", "Kubeflow Trainer v2 TrainJob (--trainjob-runtime)")):  # fmt: skip
        p = sub.add_parser(command, help=f"print a multi-node {what} manifest for a pretraining")
        p.add_argument("--stage", required=True, choices=[m.stage for m in methods.registered()])
        p.add_argument("--nodes", type=int, required=True)
        p.add_argument("--gpus-per-node", type=int, default=8)
        p.add_argument("--name", required=True, help="job name (lowercase RFC 1123)")
        p.add_argument("--namespace")
        p.add_argument(
            "--run-id", default="", help="names the checkpoint folder; reuse it to resume"
        )
        p.add_argument("--config", type=Path, help="local preset the overrides are checked against")
        p.add_argument(
            "--service-account",
            dest="pytorchjob_service_account",
            metavar="NAME",
            help=f"of the job's pods (default {PipelineOptions().pytorchjob_service_account})",
        )
        add_options(p, pytorchjob_service_account=False)
        _overrides(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return COMMANDS[args.command](args)
    except Exception as exc:
        message = _user_error(exc)
        if message is None:
            raise  # a bug: keep the traceback
        print(f"hsissl-pipeline {args.command}: error: {message}", file=sys.stderr)
        return 2


def _user_error(exc: Exception) -> str | None:
    """The one-line message of an error the user can fix (bad config, option, parameter,
    manifest field, missing file), else None."""
    if isinstance(exc, ValueError | FileNotFoundError):  # hsissl.config.ConfigError too
        return str(exc)
    try:
        from jsonschema import ValidationError
    except ImportError:  # not installed: then nothing raised one
        return None
    if isinstance(exc, ValidationError):  # a manifest field (pytorchjob.validate)
        where = ".".join(str(p) for p in exc.absolute_path) or "(the manifest)"
        return f"{where}: {exc.message}"
    return None


def _compile(args: argparse.Namespace) -> int:
    print(compile_pipeline(args.output, options_from(args), args.stage))
    return 0


def _print_local(run) -> int:
    """The run's id, status, record folder, MLflow parent run and where each output points."""
    from hsissl.layout import REPORT_HTML

    outputs = {
        task: {name: a["metadata"]["uri"] for name, a in t["artifacts"].items() if "uri" in a["metadata"]}
        for task, t in run.tasks.items()
    }  # fmt: skip
    summary = {"run_id": run.run_id, "status": run.status, "record": run.record_dir,
               "mlflow_parent_run": run.parent_run_id, "error": run.error or None,
               "outputs": {task: uris for task, uris in outputs.items() if uris}}  # fmt: skip
    print(json.dumps(summary, indent=1))
    # A plain last line for people: where to look now.
    report = Path(run.record_dir).parent.parent / "report" / REPORT_HTML  # <run_dir>/report
    shown = os.path.relpath(report) if report.is_relative_to(Path.cwd()) else str(report)
    if run.status == "SUCCEEDED" and report.is_file():
        print(f"\nDone. The report is {shown}: open it in a browser.")
    elif run.status == "SUCCEEDED":
        print(f"\nDone. Outputs are listed above; the run record is {run.record_dir}.")
    else:
        print(f"\nThe run failed ({run.error or 'see above'}); its record is {run.record_dir}.")
    return 0 if run.status == "SUCCEEDED" else 1


def _run_local(args: argparse.Namespace) -> int:
    from pipelines.dag import build_pipeline
    from pipelines.local import run_local

    parameters = pipeline_parameters(build_pipeline(), args.param)
    run = run_local(args.config, args.overrides, args.stages, parameters,
                    run_id=args.run_id, cache=args.cache, check=False)  # fmt: skip
    return _print_local(run)


def _run_stage(args: argparse.Namespace) -> int:
    from pipelines.local import local_arguments, run_stage_local

    arguments = local_arguments(args.config, args.overrides) | {
        "dataset_uri": args.dataset_uri, "encoder_uri": args.encoder_uri, "head": args.head}  # fmt: skip
    return _print_local(run_stage_local(args.stage, arguments, run_id=args.run_id, check=False))


def _rerun(args: argparse.Namespace) -> int:
    if args.host:
        from pipelines import remote

        client = remote.connect(args.host, args.namespace, args.token)
        run_id = remote.rerun(client, args.from_run, args.stage, args.overrides,
                              encoder=args.encoder, head=args.head, experiment=args.experiment,
                              opts=options_from(args), service_account=args.service_account,
                              check_version=not args.skip_version_check)  # fmt: skip
        print(json.dumps({"run_id": run_id, "rerun_of": args.from_run, "stage": args.stage}))
        return 0
    from pipelines.local import rerun_local

    return _print_local(rerun_local(args.stage, args.from_run, args.overrides, args.encoder,
                                    args.head, args.run_id, check=False))  # fmt: skip


def _submit(args: argparse.Namespace) -> int:
    from pipelines import remote

    opts = options_from(args)
    if args.package:
        from kfp import components

        pipeline = components.load_component_from_file(str(args.package))
    else:
        from pipelines.dag import build_pipeline

        pipeline = build_pipeline(opts)
    arguments = {"preset": args.config, "overrides": args.overrides}
    arguments |= pipeline_parameters(pipeline, args.param)  # before connecting: fail fast
    client = remote.connect(args.host, args.namespace, args.token)
    run_id = remote.submit(client, arguments, experiment=args.experiment, run_name=args.run_name,
                           opts=opts, package=args.package,
                           service_account=args.service_account,
                           check_version=not args.skip_version_check)  # fmt: skip
    print(json.dumps({"run_id": run_id, "experiment": args.experiment}))
    return 0


def _upload(args: argparse.Namespace) -> int:
    from pipelines import remote

    client = remote.connect(args.host, args.namespace, args.token)
    pipeline_id = remote.upload(client, args.version, pipeline=args.pipeline,
                                opts=options_from(args), package=args.package,
                                check_version=not args.skip_version_check,
                                skip_existing=args.skip_existing)  # fmt: skip
    print(json.dumps({"pipeline_id": pipeline_id, "version": args.version}))
    return 0


def _multi_node_job(args: argparse.Namespace) -> int:
    """``pytorchjob`` / ``trainjob``: the manifest the launcher would create, checked."""
    import yaml

    from components.jobs.multinode import KINDS
    from components.jobs.pytorchjob import check_k8s_name

    check_k8s_name("--name", args.name)
    if args.namespace:
        check_k8s_name("--namespace", args.namespace)
    opts = options_from(args)
    kind = KINDS[args.command]
    extra = {"runtime": opts.trainjob_runtime} if kind.key == "trainjob" else {}
    manifest = kind.build(args.stage, args.overrides, nodes=args.nodes,
                          gpus_per_node=args.gpus_per_node, name=args.name,
                          namespace=args.namespace, local_preset=args.config, opts=opts,
                          service_account=opts.pytorchjob_service_account, run_id=args.run_id,
                          **extra)  # fmt: skip
    kind.validate(manifest)
    print(yaml.safe_dump(manifest, sort_keys=False), end="")
    return 0


COMMANDS = {"compile": _compile, "run-local": _run_local, "run-stage": _run_stage,
            "rerun": _rerun, "submit": _submit, "upload": _upload,
            "pytorchjob": _multi_node_job, "trainjob": _multi_node_job}  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
