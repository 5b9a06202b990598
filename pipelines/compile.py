"""Compile the pipeline to IR YAML: ``hsissl-pipeline compile`` (``make pipeline``).

The checked-in ``pipelines/hsissl.yaml`` is compiled with the default options; a test
compiles again and compares, so any change to the DAG is reviewed in the YAML diff. CI
compiles with the digests it has just pushed (``--cpu-image``/``--train-image``
``<name>@sha256:…``). Otherwise the images are ``<registry>/hsissl-{cpu,train}:<tag>`` from the
one registry/tag setting ``pipelines/images.env`` (``--image-registry``/``--image-tag``).
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import sys
from dataclasses import replace
from pathlib import Path

from kfp import compiler

from components.images import check_reference, default_registry, default_tag, image_ref
from components.options import MULTI_NODE_APIS, PipelineOptions
from pipelines.dag import build_pipeline, build_stage_pipeline, stage_names

GOLDEN = Path(__file__).with_name("hsissl.yaml")


def compile_pipeline(path: str | Path = GOLDEN, opts: PipelineOptions | None = None,
                     stage: str | None = None) -> Path:  # fmt: skip
    """Write the DAG (or the one-stage rerun pipeline of ``stage``) as IR YAML to ``path``."""
    func = build_stage_pipeline(stage, opts) if stage else build_pipeline(opts)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(func, str(path))
    path.write_text(stable_header(path.read_text()))
    return path


_HEADER_DEFAULT = re.compile(r"^(#    \S+: \S+ \[Default: )(.+)(\])$", re.M)


def stable_header(text: str) -> str:
    """kfp's header comment prints dict defaults (gpu_tolerations) in protobuf map order, which
    differs between processes: sort their keys so the golden YAML compiles reproducibly."""

    def ordered(value):
        if isinstance(value, dict):
            return {k: ordered(value[k]) for k in sorted(value)}
        return [ordered(v) for v in value] if isinstance(value, list) else value

    def fix(match: re.Match) -> str:
        try:
            value = ast.literal_eval(match.group(2))
        except (ValueError, SyntaxError):
            return match.group(0)
        return f"{match.group(1)}{ordered(value)!r}{match.group(3)}"

    return _HEADER_DEFAULT.sub(fix, text)


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    return key, value


def _toleration(text: str) -> dict[str, str]:
    """``key[=value]:Effect`` -> a toleration (Exists without a value, Equal with one)."""
    spec, sep, effect = text.rpartition(":")
    if not sep or not spec or effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute"):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected KEY[=VALUE]:EFFECT with EFFECT NoSchedule, PreferNoSchedule or "
            "NoExecute, e.g. nvidia.com/gpu:NoSchedule"
        )
    key, has_value, value = spec.partition("=")
    if has_value:
        return {"key": key, "operator": "Equal", "value": value, "effect": effect}
    return {"key": key, "operator": "Exists", "effect": effect}


def _image(text: str) -> str:
    try:
        return check_reference(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_options(parser: argparse.ArgumentParser, pytorchjob_service_account: bool = True) -> None:
    """Flags for :class:`PipelineOptions` (shared by compile, submit, upload, rerun and
    pytorchjob). The defaults are the names the chart creates as release ``hsissl``;
    ``pytorchjob_service_account=False`` leaves that flag to the caller (``pytorchjob`` has
    ``--service-account`` for it)."""
    d = PipelineOptions()
    g = parser.add_argument_group("compile options")
    g.add_argument(
        "--image-registry",
        default=default_registry(),
        metavar="REGISTRY",
        help="images are REGISTRY/hsissl-{cpu,train}:TAG (default $HSISSL_IMAGE_REGISTRY or "
        "pipelines/images.env: %(default)s)",
    )
    g.add_argument(
        "--image-tag",
        default=default_tag(),
        metavar="TAG",
        help="(default $HSISSL_IMAGE_TAG or pipelines/images.env: %(default)s)",
    )
    g.add_argument(
        "--cpu-image",
        type=_image,
        default=os.environ.get("HSISSL_CPU_IMAGE"),
        help="full reference of the ingest/pca-poc/report image, e.g. NAME@sha256:DIGEST "
        "(default $HSISSL_CPU_IMAGE, else from --image-registry/--image-tag)",
    )
    g.add_argument(
        "--train-image",
        type=_image,
        default=os.environ.get("HSISSL_TRAIN_IMAGE"),
        help="full reference of the GPU stages' image (default $HSISSL_TRAIN_IMAGE, else from "
        "--image-registry/--image-tag)",
    )
    g.add_argument(
        "--image-pull-secret",
        action="append",
        default=[],
        metavar="NAME",
        help="Secret for pulling the images from a private registry (repeatable; or give the "
        "service account imagePullSecrets: chart value pipeline.imagePullSecrets)",
    )
    g.add_argument(
        "--cache-size",
        default=d.cache_size,
        help=f"emptyDir of the shard download cache at {d.cache_mount} in the pods that read a "
        "dataset (about the dataset size; default %(default)s)",
    )
    g.add_argument(
        "--gpu-node-selector",
        action="append",
        type=_key_value,
        metavar="KEY=VALUE",
        help="node label GPU pods require (repeatable; replaces the default "
        f"{d.gpu_node_selector}; 'none=' for no selector)",
    )
    g.add_argument(
        "--gpu-toleration",
        action="append",
        type=_toleration,
        metavar="KEY[=VALUE]:EFFECT",
        help="taint GPU pods tolerate (repeatable; replaces the default nvidia.com/gpu:NoSchedule)",
    )
    g.add_argument("--no-gpu-toleration", action="store_true", help="no tolerations on GPU pods")
    g.add_argument(
        "--job-pod-annotation",
        action="append",
        type=_key_value,
        metavar="KEY=VALUE",
        help="annotation of multi-node job pods (repeatable; replaces the default "
        f"{d.job_pod_annotations}; 'none=' for none)",
    )
    g.add_argument(
        "--s3-secret",
        default=d.s3_secret,
        help="Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (default %(default)s)",
    )
    g.add_argument(
        "--mlflow-secret",
        default=d.mlflow_secret,
        help="optional Secret with MLFLOW_TRACKING_USERNAME/PASSWORD (default %(default)s)",
    )
    g.add_argument(
        "--env-config-map",
        default=d.env_config_map,
        metavar="NAME",
        help="ConfigMap with HSISSL_S3_ENDPOINT, AWS_REGION, MLFLOW_TRACKING_URI "
        "(default %(default)s; the chart's <release>-pipeline-env)",
    )
    g.add_argument(
        "--config-map",
        default=d.config_map,
        metavar="NAME",
        help=f"ConfigMap with config.yaml, mounted at {d.config_mount} "
        "(default %(default)s; the chart's <release>-pipeline-config)",
    )
    if pytorchjob_service_account:
        g.add_argument(
            "--pytorchjob-service-account",
            metavar="NAME",
            help="service account of multi-node job pods (default: --service-account "
            f"where the command has it, else {d.pytorchjob_service_account})",
        )
    g.add_argument("--multi-node-api", choices=MULTI_NODE_APIS, default=d.multi_node_api,
                   help="job API of nodes > 1: Kubeflow Trainer v2 TrainJob, Training Operator "
                        "PyTorchJob, or auto = TrainJob where the cluster serves it, else "
                        "PyTorchJob (default %(default)s)")  # fmt: skip
    g.add_argument(
        "--trainjob-runtime",
        default=d.trainjob_runtime,
        metavar="NAME",
        help="ClusterTrainingRuntime of TrainJobs (default %(default)s)",
    )
    g.add_argument(
        "--shm-size", default=d.shm_size, help="/dev/shm of GPU pods (default %(default)s)"
    )
    g.add_argument("--data-pvc", default=d.data_pvc, metavar="CLAIM",
                   help=f"PersistentVolumeClaim with the source scenes, mounted into ingest at "
                        f"{d.data_mount} (then source=/data/...)")  # fmt: skip


def options_from(args: argparse.Namespace) -> PipelineOptions:
    """The :class:`PipelineOptions` the flags of :func:`add_options` ask for."""
    d = PipelineOptions()
    # PyTorchJob pods run as the run's pods do unless told otherwise (submit, rerun)
    job_account = (getattr(args, "pytorchjob_service_account", None)
                   or getattr(args, "service_account", None) or d.pytorchjob_service_account)  # fmt: skip
    try:
        images = {kind: getattr(args, f"{kind}_image")
                  or image_ref(kind, args.image_registry, args.image_tag) for kind in ("cpu", "train")}  # fmt: skip
    except ValueError as err:  # a usage error, as argparse reports one
        print(f"hsissl-pipeline: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    opts = replace(d, cpu_image=images["cpu"], train_image=images["train"],
                   image_pull_secrets=list(args.image_pull_secret), cache_size=args.cache_size,
                   s3_secret=args.s3_secret, mlflow_secret=args.mlflow_secret,
                   env_config_map=args.env_config_map, config_map=args.config_map,
                   pytorchjob_service_account=job_account, shm_size=args.shm_size,
                   data_pvc=args.data_pvc, multi_node_api=args.multi_node_api,
                   trainjob_runtime=args.trainjob_runtime)  # fmt: skip
    if args.gpu_node_selector:
        selector = {k: v for k, v in args.gpu_node_selector if k != "none"}
        opts = replace(opts, gpu_node_selector=selector)
    if args.job_pod_annotation:
        annotations = {k: v for k, v in args.job_pod_annotation if k != "none"}
        opts = replace(opts, job_pod_annotations=annotations)
    if args.no_gpu_toleration:
        opts = replace(opts, gpu_tolerations=[])
    elif args.gpu_toleration:
        opts = replace(opts, gpu_tolerations=list(args.gpu_toleration))
    return opts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.compile", description=__doc__)
    parser.add_argument("--output", "-o", type=Path, default=GOLDEN, help="default %(default)s")
    parser.add_argument(
        "--stage", choices=stage_names(), help="compile the one-stage rerun pipeline"
    )
    add_options(parser)
    args = parser.parse_args(argv)
    print(compile_pipeline(args.output, options_from(args), args.stage))
    return 0


if __name__ == "__main__":
    sys.exit(main())
