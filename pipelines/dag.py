"""The hsissl DAG, and the one-stage pipelines that rerun a stage on earlier artifacts.

    open-lineage -> ingest -> pca-poc
                           -> baseline-deeplabv3plus
                           -> [if run_<method>] [if nodes > 1] launch-pytorchjob -> finetune x heads
                                                [else]        pretrain-<method>  -> finetune x heads
                           -> [if control_encoder] random-init encoder -> finetune-heads x heads
    report: the exit task, after everything (also after a failure: it reports what finished)

Multi-node pretraining (``nodes`` > 1) is a light task that runs the pretraining as a
Kubeflow Trainer TrainJob or Training Operator PyTorchJob and emits the same encoder as the
single pod. Each branch has its own finetune-heads loop instead of one loop over
``dsl.OneOf`` of the two encoders: kfp.local (``make run``) cannot resolve a OneOf of
artifacts in kfp 2.17 ("Expected 1 artifact in ArtifactSelectorSpec"), and this way the same DAG runs everywhere; only one branch runs.

``build_pipeline(opts)`` is the pipeline function that is compiled, submitted and run
locally under ``kfp.local``: one definition for all three. (No ``from __future__ import
annotations`` here: KFP reads the pipeline parameters' types from real annotations.)
"""

import inspect
from collections.abc import Callable, Iterable
from functools import partial

from kfp import dsl

from components.baseline_deeplabv3plus import baseline_deeplabv3plus
from components.finetune_heads import finetune_heads
from components.ingest import ingest
from components.launch_pytorchjob import launch_pytorchjob
from components.lineage import close_lineage, open_lineage
from components.options import PipelineOptions
from components.pca_poc import pca_poc
from components.pretrain import pretrain_component
from components.refs import dataset_ref, encoder_ref
from components.report import report
from hsissl import methods
from pipelines.k8s import configure, mount_data

PIPELINE_NAME = "hsissl"
HEADS = ["linear", "conv", "segmenter"]
CONTROL_ENCODER = "random"  # a random init of the config's MAE encoder architecture
RUN_ID = dsl.PIPELINE_JOB_ID_PLACEHOLDER  # only for uncached tasks: it differs in every run


def stage_names() -> tuple[str, ...]:
    """The stages a (sub-)DAG can hold: pretrain-<method> for every registered method."""
    return ("ingest", "pca-poc", *(m.stage for m in methods.registered()), "finetune-heads",
            "baseline-deeplabv3plus", "report")  # fmt: skip


def _placement_defaults(opts: PipelineOptions) -> tuple[dict, list]:
    """Defaults of the run parameters gpu_node_selector / gpu_tolerations: the compile flags'."""
    return dict(opts.gpu_node_selector), [dict(t) for t in opts.gpu_tolerations]


def _check_stages(wanted: Iterable[str]) -> frozenset[str]:
    wanted = frozenset(wanted)
    unknown = sorted(wanted - set(stage_names()))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; expected some of {list(stage_names())}")
    return wanted


def _with_run_flags(registered: list[methods.Method]) -> Callable[[Callable], Callable]:
    """Give the pipeline function (whose ``*run_flags`` take them, in this order) a parameter
    ``run_<method>: bool = True`` per method: in its signature, which kfp reads (and calls the
    function positionally in), and in its docstring's Args (the KFP UI's descriptions)."""

    def decorate(pipeline: Callable) -> Callable:
        signature = inspect.signature(pipeline)
        fixed = [p for p in signature.parameters.values() if p.kind is not p.VAR_POSITIONAL]
        flags = [inspect.Parameter(f"run_{m.name}", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                   default=True, annotation=bool) for m in registered]  # fmt: skip
        pipeline.__signature__ = signature.replace(parameters=[*fixed, *flags])
        anchor = "            heads: "  # the flags' descriptions go before it, as they always did
        if anchor not in pipeline.__doc__:
            raise ValueError(f"the pipeline's docstring has no {anchor.strip()!r} argument")
        docs = "".join(f"            run_{m.name}: Pretrain {m.noun or m.label}.\n"
                       for m in registered)  # fmt: skip
        pipeline.__doc__ = pipeline.__doc__.replace(anchor, docs + anchor, 1)
        return pipeline

    return decorate


def _exit_task(opts: PipelineOptions, with_report: bool, common: dict, storage_uri, run_id):
    """The ExitHandler's task: the report (which also closes the lineage) or just the close."""
    if with_report:
        task = report(storage_uri=storage_uri, kfp_run_id=run_id, **common)
        return configure(task, "cpu", opts, cache=False)
    return configure(close_lineage(kfp_run_id=run_id, **common), "light", opts, cache=False)


def build_pipeline(opts: PipelineOptions | None = None, stages: Iterable[str] | None = None
                   ) -> Callable:  # fmt: skip
    """The full DAG, or a sub-DAG of ``stages`` (None: all; ingest is always in it)."""
    opts = opts or PipelineOptions()
    stages = _check_stages(stage_names() if stages is None else stages) | {"ingest"}
    registered = methods.registered()
    default_preset = opts.default_preset
    default_selector, default_tolerations = _placement_defaults(opts)
    labels = "/".join(m.label for m in registered)

    @dsl.pipeline(name=PIPELINE_NAME, description="Self-supervised pretraining on WHU-OHS "
                  f"hyperspectral tiles: ingest, {labels} pretraining, segmentation "
                  "heads on frozen encoders, DeepLabV3+ baseline, PCA proof of concept, report.")  # fmt: skip
    @_with_run_flags(registered)
    def hsissl(
        source: str = "",
        preset: str = default_preset,
        overrides: list = [],  # noqa: B006 - KFP reads parameter defaults from the signature
        storage_uri: str = "",
        tracking_uri: str = "",
        heads: list = HEADS,
        control_encoder: str = CONTROL_ENCODER,
        pretrain_epochs: float = 0.0,
        pretrain_max_steps: int = 0,
        gpus: int = 1,
        gpu_type: str = "nvidia.com/gpu",
        nodes: int = 1,
        gpu_node_selector: dict = default_selector,
        gpu_tolerations: list = default_tolerations,
        data_pvc: str = opts.data_pvc,
        *run_flags,
    ):
        """The hsissl DAG (parameter descriptions show in the KFP UI).

        Args:
            source: Where WHU-OHS is: s3://bucket/prefix (uploaded to the object store), a
                folder in the pod (with --data-pvc), or "generated" for the generated dataset
                ("" means that only under kfp.local; on a cluster it is an error).
            preset: Config preset: a path in the pod, or a name in configs/ (tiny, base).
            overrides: Dotted config overrides, e.g. ["pretrain.epochs=50"].
            storage_uri: Artifact store (s3://bucket/prefix); "" = the preset's.
            tracking_uri: MLflow tracking URI; "" = the preset's or $MLFLOW_TRACKING_URI.
            heads: Segmentation heads finetuned on every encoder (linear, conv, segmenter).
            control_encoder: Random-init control: "random" (the config's MAE architecture),
                random:<factory>, or "" for none.
            pretrain_epochs: Pretraining epochs; 0 = the preset's.
            pretrain_max_steps: Pretraining steps (overrides epochs); 0 = the preset's.
            gpus: Accelerators per training pod or node (more than 1: torchrun, one each).
            gpu_type: Accelerator resource name.
            nodes: Nodes per pretraining; more than 1: a Kubeflow Trainer TrainJob or PyTorchJob.
            gpu_node_selector: Node labels GPU pods require, e.g. {"nvidia.com/gpu.present":
                "true"}; {} = none.
            gpu_tolerations: Taints GPU pods tolerate (Kubernetes tolerations, JSON list);
                [] = none.
            data_pvc: PersistentVolumeClaim mounted into ingest at /data (source=/data/...);
                only in a pipeline compiled with --data-pvc, whose claim is the default.
        """
        common = {"preset": preset, "overrides": overrides, "tracking_uri": tracking_uri}
        train = {"gpus": gpus, "gpu_type": gpu_type, "node_selector": gpu_node_selector,
                 "tolerations": gpu_tolerations}  # fmt: skip
        exit_task = _exit_task(opts, "report" in stages, common, storage_uri, RUN_ID)
        with dsl.ExitHandler(exit_task, name="hsissl-stages"):
            lineage = open_lineage(kfp_run_id=RUN_ID, source=source, storage_uri=storage_uri,
                                   **common)  # fmt: skip
            configure(lineage, "light", opts, cache=False)
            data = ingest(source=source, storage_uri=storage_uri, data_pvc=data_pvc,
                          pvc_mounted=bool(opts.data_pvc), **common).after(lineage)  # fmt: skip
            configure(data, "cpu", opts, cache=True, retry=True)
            mount_data(data, opts, data_pvc)
            dataset = data.outputs["dataset"]
            if "pca-poc" in stages:
                configure(pca_poc(dataset=dataset, **common), "cpu", opts, cache=True)
            if "baseline-deeplabv3plus" in stages:
                task = baseline_deeplabv3plus(dataset=dataset, **common)
                configure(task, "train", opts, cache=True, **train)
            if "finetune-heads" in stages:
                with dsl.If(control_encoder != "", name="random-init-control"):
                    ref = encoder_ref(uri=control_encoder, preset=preset, overrides=overrides,
                                      storage_uri=storage_uri, method="", source_run_id="")  # fmt: skip
                    configure(ref, "light", opts, cache=True, name="random-init-encoder")
                    _finetune_all(opts, heads, dataset, ref.outputs["encoder"], "random-init",
                                  common, train)  # fmt: skip
            flags = {m.name: flag for m, flag in zip(registered, run_flags, strict=True)}
            pretrain = {"dataset": dataset, "epochs": pretrain_epochs,
                        "max_steps": pretrain_max_steps, "kfp_run_id": RUN_ID, **common}  # fmt: skip
            for method in flags:
                if f"pretrain-{method}" not in stages:
                    continue
                finetune = None
                if "finetune-heads" in stages:  # (encoder) -> the heads on it
                    finetune = partial(_finetune_all, opts, heads, dataset, label=method,
                                       common=common, train=train)  # fmt: skip
                with dsl.If(flags[method] == True, name=f"run-{method}"):  # noqa: E712 - a DSL condition
                    _pretrain(method, nodes, opts, pretrain, train, finetune)

    return hsissl


def _pretrain(method: str, nodes, opts: PipelineOptions, pretrain: dict, train: dict,
              then: Callable | None = None) -> None:  # fmt: skip
    """Pretrain ``method``: a PyTorchJob when ``nodes`` > 1, else one GPU pod. ``then(encoder)``
    adds what consumes the encoder, once in each branch (see the module docstring)."""
    with dsl.If(nodes > 1, name=f"{method}-multi-node"):
        job = launch_pytorchjob(method=method, nodes=nodes, gpus_per_node=train["gpus"],
                                gpu_type=train["gpu_type"], options=opts.to_json(),
                                gpu_node_selector=train["node_selector"],
                                gpu_tolerations=train["tolerations"], **pretrain)  # fmt: skip
        # Light: the GPUs are the PyTorchJob's. Retried: it adopts its job.
        configure(job, "light", opts, cache=False, retry=True, name=f"pytorchjob-{method}")
        if then is not None:
            then(job.outputs["encoder"])
    with dsl.Else(name=f"{method}-single-pod"):
        task = pretrain_component(method)(**pretrain)
        # Not cached: a retried pod resumes from the checkpoint instead.
        configure(task, "train", opts, cache=False, retry=True, **train)
        if then is not None:
            then(task.outputs["encoder"])


def _finetune_all(opts, heads, dataset, encoder, label: str, common: dict, train: dict) -> None:
    with dsl.ParallelFor(heads, name=f"heads-{label}") as head:
        task = finetune_heads(dataset=dataset, encoder=encoder, head=head, **common)
        configure(task, "train", opts, cache=True, name=f"finetune-{label}", **train)


def build_stage_pipeline(stage: str, opts: PipelineOptions | None = None) -> Callable:
    """``stage`` alone, on artifacts already in the store (a rerun): nothing upstream runs.

    Inputs are referenced, not recomputed: ``dataset_uri`` ("" = the dataset the config
    names) and, for finetune-heads, ``encoder_uri`` ("" = the encoder that pretraining
    ``encoder_method`` wrote in pipeline run ``source_run_id``; or ``random:<factory>``).
    A pretraining rerun with ``nodes`` > 1 runs as a PyTorchJob, as in the full DAG.
    """
    opts = opts or PipelineOptions()
    _check_stages([stage])
    default_preset = opts.default_preset
    default_selector, default_tolerations = _placement_defaults(opts)

    @dsl.pipeline(
        name=f"{PIPELINE_NAME}-{stage}", description=f"Rerun {stage} on earlier artifacts."
    )
    def hsissl_stage(
        source: str = "",
        preset: str = default_preset,
        overrides: list = [],  # noqa: B006 - KFP reads parameter defaults from the signature
        storage_uri: str = "",
        tracking_uri: str = "",
        dataset_uri: str = "",
        encoder_uri: str = "",
        encoder_method: str = "mae",
        source_run_id: str = "",
        head: str = "",
        pretrain_epochs: float = 0.0,
        pretrain_max_steps: int = 0,
        gpus: int = 1,
        gpu_type: str = "nvidia.com/gpu",
        nodes: int = 1,
        gpu_node_selector: dict = default_selector,
        gpu_tolerations: list = default_tolerations,
        data_pvc: str = opts.data_pvc,
    ):
        common = {"preset": preset, "overrides": overrides, "tracking_uri": tracking_uri}
        train = {"gpus": gpus, "gpu_type": gpu_type, "node_selector": gpu_node_selector,
                 "tolerations": gpu_tolerations}  # fmt: skip
        exit_task = _exit_task(opts, stage == "report", common, storage_uri, RUN_ID)
        with dsl.ExitHandler(exit_task, name=f"rerun-{stage}"):
            lineage = open_lineage(kfp_run_id=RUN_ID, source=source, storage_uri=storage_uri,
                                   **common)  # fmt: skip
            configure(lineage, "light", opts, cache=False)
            if stage == "report":
                return  # the exit task is the stage
            if stage == "ingest":
                task = ingest(source=source, storage_uri=storage_uri, data_pvc=data_pvc,
                              pvc_mounted=bool(opts.data_pvc), **common).after(lineage)  # fmt: skip
                configure(task, "cpu", opts, cache=False, retry=True)
                mount_data(task, opts, data_pvc)
                return
            ref = dataset_ref(uri=dataset_uri, preset=preset, overrides=overrides,
                              storage_uri=storage_uri).after(lineage)  # fmt: skip
            configure(ref, "light", opts, cache=False)
            dataset = ref.outputs["dataset"]
            if stage.startswith("pretrain-"):
                pretrain = {"dataset": dataset, "epochs": pretrain_epochs,
                            "max_steps": pretrain_max_steps, "kfp_run_id": RUN_ID, **common}  # fmt: skip
                _pretrain(stage.removeprefix("pretrain-"), nodes, opts, pretrain, train)
            elif stage == "finetune-heads":
                enc = encoder_ref(uri=encoder_uri, preset=preset, overrides=overrides,
                                  storage_uri=storage_uri, method=encoder_method,
                                  source_run_id=source_run_id)  # fmt: skip
                configure(enc, "light", opts, cache=False)
                task = finetune_heads(dataset=dataset, encoder=enc.outputs["encoder"], head=head,
                                      **common)  # fmt: skip
                configure(task, "train", opts, cache=False, **train)
            elif stage == "pca-poc":
                configure(pca_poc(dataset=dataset, **common), "cpu", opts, cache=False)
            else:
                task = baseline_deeplabv3plus(dataset=dataset, **common)
                configure(task, "train", opts, cache=False, **train)

    return hsissl_stage
