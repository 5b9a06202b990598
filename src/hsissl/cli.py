"""``hsissl <stage> --config configs/tiny.yaml key.sub=value …``

Every stage is ``hsissl.stages.<module>.run(cfg)``; this file only parses arguments,
loads the config and maps failures to exit codes (2: bad input or config, 130: Ctrl-C).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import textwrap
from pathlib import Path

from hsissl import methods
from hsissl.config import ConfigError, load_config
from hsissl.stages.results import IngestCheck, StageResult

# stage name -> (module under hsissl.stages, one-line help). Adding a stage = one line here;
# the pretraining methods' stages (pretrain-<method>) come from hsissl.methods (:func:`stages`).
BASE_STAGES: dict[str, tuple[str, str]] = {
    "convert": (
        "convert",
        "any hyperspectral cube (ENVI, GeoTIFF, .mat/.npy + sidecar) -> WHU-OHS layout, OHS bands",
    ),
    "make-synthetic": (
        "synthetic",
        "write the generated WHU-OHS-layout dataset (the default input)",
    ),
    "ingest": ("ingest", "validate scenes, tile, shard into the artifact store, band statistics"),
    "finetune": (
        "finetune",
        "train a segmentation head on a frozen encoder (or a random-init control)",
    ),
    "baseline-deeplabv3plus": (
        "baseline",
        "train DeepLabV3+ (ResNet-50 V1c, FCN aux head) from scratch on whole scenes",
    ),
    "pca-poc": (
        "pca_poc",
        "PCA 32->3 bands: explained variance, band decoder and MAE reconstruction checks",
    ),
    "report": ("report", "one HTML page + Markdown summary over every result in the store"),
    "evaluate-real": (
        "evaluate_real",
        "pretrain + evaluate on the real scenes with block splits (docs/real-data.md)",
    ),
}

PRETRAIN_AFTER = "ingest"  # where the pretraining stages go in the list


def stages() -> dict[str, tuple[str, str]]:
    """Every stage: :data:`BASE_STAGES` with ``pretrain-<method>`` (module ``pretrain``) for
    each registered method after ingest."""
    out: dict[str, tuple[str, str]] = {}
    for name, entry in BASE_STAGES.items():
        out[name] = entry
        if name == PRETRAIN_AFTER:
            out |= {m.stage: ("pretrain", m.summary) for m in methods.registered()}
    return out


# Longer help for stages whose use is not obvious from their config keys.
DETAILS: dict[str, str] = {
    "convert": "Reads ENVI (.hdr + binary), GeoTIFF with per-band wavelengths, or .mat/.npy with a "
    "sidecar YAML (wavelengths, labels, scale: docs/convert.md); resamples to the 32 OHS bands "
    "(Gaussian SRFs when FWHM is known, else linear); writes <dst>/<split>/{image,label}/<name>.tif "
    "with the georeference and meta/<name>.json of what was assumed. Then: hsissl ingest "
    "data.source=<dst> (it prints the exact command).",
    "evaluate-real": "Does pretraining help? Preset: --config configs/real.yaml (one setting for "
    "every scene: MAE at patch 4 with a spectral stem, the per-pixel probe heads). Pretrains "
    "real.methods on every scene of real.source (logging a k-NN probe of the labelled pixels "
    "every pretrain.knn_every steps), then per scene in real.scenes and per block-split protocol "
    "and seed: per-pixel floors, DeepLabV3+, the random-init control of each architecture and "
    "each method x head; a progress bar names what runs. Writes "
    "results/<real.name>/metrics.json and tables.{json,md} (mean ± std over seeds, paired "
    "differences to the better floor and the control); scripts/real_table.py puts the tables "
    "into docs/real-data.md.",
}

# Stage-specific flags: shorthands for config keys (the flag wins over a KEY=VALUE override).
FLAGS: dict[str, dict[str, tuple[str, str]]] = {
    "convert": {
        "--src": ("convert.src", "ENVI .hdr, GeoTIFF, .mat/.npy (+ sidecar), a sidecar, a folder"),
        "--dst": ("convert.dst", "output root: <dst>/<split>/{image,label,meta}/"),
        "--split": ("convert.split", "tr | va | ts (default tr)"),
        "--sidecar": ("convert.sidecar", "sidecar YAML for a single --src"),
        "--label": ("convert.label", "label raster / .npy on the image grid, for a single --src"),
    },
    "finetune": {
        "--encoder": (
            "finetune.encoder",
            "encoder record URI (…/checkpoints/<name>/encoder.pt), a registered version "
            "(models:/hsissl-mae/3, models:/hsissl-mae@champion) or random:<factory>",
        ),
        "--head": ("finetune.head", "linear | conv | segmenter"),
    },
}

EPILOG = """\
Settings come from the dataclass defaults (the paper's settings), then the --config preset,
then KEY=VALUE overrides with dotted keys, e.g.:
  hsissl ingest --config configs/tiny.yaml data.tile_size=32 data.source=/data/WHU-OHS
  hsissl ingest --config configs/base.yaml data.source=s3://hsissl/WHU-OHS   # read in place
Each run saves its fully resolved config beside its outputs and in MLflow.
Exit codes: 0 ok, 1 unexpected error, 2 invalid input data or config (report: inputs missing,
the page is still written), 75 another writer of the same dataset/checkpoint is running
(try again later), 130 interrupted (Ctrl-C or SIGTERM)."""

EXIT_INTERRUPTED = 128 + 2  # the shell's code for a command stopped by SIGINT
EXIT_BUSY = 75  # sysexits.h EX_TEMPFAIL: another writer holds the lease; nothing is wrong here


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hsissl",
        description="Self-supervised pretraining pipeline for hyperspectral imagery (WHU-OHS).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for name, (_, help_text) in stages().items():
        description = help_text + (
            f"\n\n{textwrap.fill(DETAILS[name], 92)}" if name in DETAILS else ""
        )
        p = sub.add_parser(name, help=help_text, description=description, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
        p.add_argument(
            "--config", type=Path, help="YAML preset (configs/tiny.yaml, configs/base.yaml)"
        )
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
        for flag, (key, help_text) in FLAGS.get(name, {}).items():
            p.add_argument(
                flag, dest=key, metavar=key.split(".")[-1].upper(), help=f"{help_text} (= {key})"
            )
        if name == "ingest":
            p.add_argument("--report", action="store_true",
                           help="check every file and list all violations; write nothing")  # fmt: skip
    tracking = sub.add_parser(
        "tracking", help="MLflow housekeeping: send what an outage kept on disk",
        description="MLflow housekeeping.",
    )  # fmt: skip
    actions = tracking.add_subparsers(dest="action", metavar="ACTION", required=True)
    sync = actions.add_parser(
        "sync", help="send the metrics and final states an MLflow outage kept in <run_dir>",
        description="Send what runs of RUN_DIR could not send during an MLflow outage (kept in "
        "RUN_DIR/mlflow-outbox/), then mark those runs FINISHED/FAILED as their process ended "
        "them. Each stage does this by itself when it starts and reaches MLflow.",
    )  # fmt: skip
    sync.add_argument("run_dir", type=Path, help="the run folder (run_dir), e.g. runs/tiny")
    sync.add_argument("--uri", help="send to this tracking URI instead of the one recorded")
    return parser


def _tracking_sync(run_dir: Path, uri: str | None) -> int:
    from hsissl import tracking_outbox

    sent, failed = tracking_outbox.sync(run_dir, send_to=uri)
    for line in sent:
        print(f"sent: {line}")
    for line in failed:
        print(f"hsissl tracking sync: not sent yet: {line}", file=sys.stderr)
    if not sent and not failed:
        print(f"nothing to send in {run_dir / tracking_outbox.OUTBOX}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # KEY=VALUE overrides may follow flags too (argparse stops the positional list at a flag).
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*getattr(args, "overrides", []), *extra]
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    if not args.debug:  # each GDAL error / HTTP retry is logged; the one error line says it all
        logging.getLogger("rasterio").setLevel(logging.WARNING)
        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    if args.stage == "tracking":
        return _tracking_sync(args.run_dir, args.uri)
    from hsissl.data.normalize import NormalizerMismatch
    from hsissl.data.resample import ConvertError
    from hsissl.data.scenes import DataContractError
    from hsissl.pretrain.checkpoint import CheckpointError
    from hsissl.storage import LeaseHeld, StorageError
    from hsissl.tracking import TrackingError

    try:
        flags = [f"{key}={getattr(args, key)}" for key, _ in FLAGS.get(args.stage, {}).values()
                 if getattr(args, key, None) is not None]  # fmt: skip
        cfg = load_config(args.config, [*args.overrides, *flags])
        module = importlib.import_module(f"hsissl.stages.{stages()[args.stage][0]}")
        kwargs = {"report": True} if getattr(args, "report", False) else {}
        method = methods.of_stage(args.stage)
        if method is not None:
            kwargs["method"] = method.name
        result = module.run(cfg, **kwargs)
    except KeyboardInterrupt as exc:
        if args.debug:
            raise
        how = f" ({exc})" if str(exc) else ""  # the trainer says at which step it stopped
        print(f"hsissl {args.stage}: interrupted{how}{_resume_hint(args.stage)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except LeaseHeld as exc:
        print(f"hsissl {args.stage}: {exc}", file=sys.stderr)
        return EXIT_BUSY
    # FileNotFoundError: a dataset, scene or checkpoint the user named is missing;
    # Tracking/StorageError: the MLflow server or object store the config names is unusable
    except (ConfigError, DataContractError, NormalizerMismatch, CheckpointError, ConvertError,
            FileNotFoundError, TrackingError, StorageError) as exc:  # fmt: skip
        print(f"hsissl {args.stage}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if args.debug:
            raise
        print(f"hsissl {args.stage}: failed: {type(exc).__name__}: {exc} (rerun with --debug for the "
              "traceback)", file=sys.stderr)  # fmt: skip
        return 1
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 prints the result once
        return 0
    return _print_result(args.stage, result)


def _resume_hint(stage: str) -> str:
    """Pretraining saves resumable checkpoints; the other stages start over."""
    if methods.of_stage(stage) is not None:
        return "; rerun the same command to resume from the last checkpoint"
    return ""


def _print_result(stage: str, result: StageResult) -> int:
    if isinstance(result, IngestCheck):
        for v in result.violations:
            print(v)
        print(f"{len(result.violations)} violation(s) in {result.source}")
        return 2 if result.violations else 0
    print(json.dumps(result.summary(), indent=1, default=str))
    # The report is written even when inputs are missing (it is the pipeline's exit task);
    # from the command line, an incomplete report is a failed request.
    for problem in result.failures():
        print(f"hsissl {stage}: error: {problem}", file=sys.stderr)
    return 2 if result.failures() else 0


if __name__ == "__main__":
    sys.exit(main())
