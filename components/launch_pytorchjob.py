"""launch-pytorchjob: multi-node pretraining (pipeline parameter nodes > 1) as a Kubeflow
Trainer v2 TrainJob or a Training Operator PyTorchJob, whichever the cluster serves
(``components.jobs.multinode``; the name predates TrainJob support); this light pod creates it,
waits, and emits the encoder record exactly as the single-pod pretrain task would."""

from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.base import cpu_component


@cpu_component
def launch_pytorchjob(
    method: str,
    dataset: Input[Dataset],
    preset: str,
    overrides: list,
    tracking_uri: str,
    epochs: float,
    max_steps: int,
    kfp_run_id: str,
    nodes: int,
    gpus_per_node: int,
    gpu_type: str,
    options: str,
    encoder: Output[Model],
    metrics: Output[Metrics],
    gpu_node_selector: dict,
    gpu_tolerations: list,
    namespace: str = "",
    timeout_s: int = 604800,  # a week (a literal: only the function's source runs in the pod)
):
    """Pretrain ``method`` on ``nodes`` x ``gpus_per_node`` GPUs; a retried task adopts the job
    it created before. ``options``: compile-time PipelineOptions (JSON); ``gpu_node_selector`` /
    ``gpu_tolerations``: the run's GPU placement of the job's pods ({} / [] = none);
    ``namespace`` "" = the pod's; ``timeout_s``: then the job is deleted (its checkpoints stay)."""
    from components.jobs import launcher

    request = launcher.LaunchRequest(method, dataset, preset, overrides, tracking_uri, epochs,
                                     max_steps, kfp_run_id, nodes, gpus_per_node, gpu_type,
                                     options, namespace, timeout_s, gpu_node_selector,
                                     gpu_tolerations)  # fmt: skip
    launcher.launch(request, encoder, metrics)
