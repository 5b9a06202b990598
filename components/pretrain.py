"""pretrain-<method>: pretrain a registered method (hsissl.methods) on the training tiles;
writes an encoder record. One component per method, all from one template.

A lightweight component ships its function's source text to the pod, so each method's function
is written out from :data:`TEMPLATE` (``def pretrain_<method>(…)``) and compiled with its source
in ``linecache``, where ``inspect.getsource`` (and so kfp) finds it.
"""

from __future__ import annotations

import functools
import linecache

from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.base import train_component
from hsissl import methods

TEMPLATE = '''\
def pretrain_{name}(
    dataset: Input[Dataset],
    preset: str,
    overrides: list,
    tracking_uri: str,
    epochs: float,
    max_steps: int,
    kfp_run_id: str,
    encoder: Output[Model],
    metrics: Output[Metrics],
):
    """Resumes from this pipeline run's checkpoint when retried (epochs/max_steps 0 = preset)."""
    from components import runtime

    runtime.pretrain("{name}", dataset, preset, overrides, tracking_uri, epochs, max_steps,
                     kfp_run_id, encoder, metrics)  # fmt: skip
'''


@functools.cache
def pretrain_component(method: str):
    """The KFP component ``pretrain-<method>`` of a registered method."""
    name = methods.get(method).name
    source = TEMPLATE.format(name=name)
    filename = f"<components.pretrain: pretrain_{name}>"
    # mtime None: linecache.checkcache keeps an entry without a file on disk
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {"__name__": __name__, "Dataset": Dataset, "Input": Input, "Metrics": Metrics,
                 "Model": Model, "Output": Output}  # fmt: skip
    exec(compile(source, filename, "exec", dont_inherit=True), namespace)  # noqa: S102 - our template, a method name
    return train_component(namespace[f"pretrain_{name}"])
