"""The reconstruction checks: per-band error of the PCA inverse, the trained decoder and
optionally a pretrained MAE (on its masked patches), all on the same held-out tiles."""

from __future__ import annotations

import numpy as np
import torch

from hsissl.data.loaders import bind
from hsissl.data.normalize import Normalizer
from hsissl.data.shards import ShardDataset, SplitView
from hsissl.pca.basis import PCA, project, reconstruct
from hsissl.pretrain import checkpoint
from hsissl.pretrain.context import StageContext
from hsissl.pretrain.reconstruction import TrainedMAE, load_mae
from hsissl.pretrain.reconstruction import reconstruct as mae_reconstruct

EVAL_TILES = 256  # held-out tiles every reconstruction error is measured on
EVAL_SPLITS = ("va", "ts")  # first present is the held-out split; else tiles of "tr"


def eval_view(dataset: ShardDataset) -> SplitView:
    for name in EVAL_SPLITS:
        if name in dataset.splits and len(dataset.split(name)):
            return dataset.split(name)
    return dataset.split("tr")  # e.g. real data ingested as one split


def eval_indices(view: SplitView, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 1)  # + 1: not the PCA's fit sample
    return np.sort(rng.choice(len(view), size=min(EVAL_TILES, len(view)), replace=False))


def load_mae_check(uri: str, dataset: ShardDataset, device: torch.device) -> TrainedMAE:
    """The whole MAE of the run whose encoder record is ``uri``, checked to fit ``dataset``:
    an MAE, normalised as the dataset, at the record's step, trained on its tile size."""
    _, normalizer, record = checkpoint.load_model(uri)
    if record.get("method") != "mae":
        raise ValueError(f"pca.encoder={uri}: a {record.get('method')!r} encoder record; "
                         "the 32-band reconstruction check needs an MAE run")  # fmt: skip
    bind(dataset, normalizer)  # refuses an MAE trained on differently normalised data
    train_pt = f"{uri.rstrip('/').rpartition('/')[0]}/{checkpoint.TRAIN_STATE}"
    try:
        mae = load_mae(uri, device)
    except FileNotFoundError:
        raise FileNotFoundError(f"{train_pt}: no MAE training state beside "
                                f"{uri}; the check needs the MAE decoder") from None  # fmt: skip
    if mae.step != record.get("step"):
        raise ValueError(
            f"{train_pt} is at step {mae.step} but {uri} "
            f"at step {record.get('step')}: not the same point of one run"
        )
    tile = record["config"]["data"]["tile_size"]
    if tile != dataset.manifest["tile_size"]:
        raise ValueError(f"pca.encoder={uri}: the MAE was trained on {tile}"
                         f"-px tiles; dataset {dataset.uri} has {dataset.manifest['tile_size']}-px "
                         "tiles")  # fmt: skip
    return mae


@torch.no_grad()
def reconstruction_errors(
    view: SplitView, indices: np.ndarray, normalizer: Normalizer, pca: PCA, decoder: torch.nn.Module,
    mae: TrainedMAE | None, ctx: StageContext, batch_size: int,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:  # fmt: skip
    """Per-band MSE (C,) of each reconstruction on the tiles ``indices``, and the first tile's
    reconstructions (C, T, T) for the report. The MAE error counts its masked pixels only."""
    mean, comps = pca.tensors(ctx.device)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, float] = {}
    sample: dict[str, np.ndarray] = {}
    for start in range(0, len(indices), batch_size):
        images, _ = view.get(indices[start : start + batch_size])
        x = normalizer(torch.from_numpy(images).to(ctx.device))  # (B, C, T, T)
        z = project(x, mean, comps)  # (B, K, T, T)
        outputs = {"pca": (reconstruct(z, mean, comps), None), "decoder": (decoder(z), None)}
        if mae is not None:  # masks seeded per batch: every run checks the same patches
            outputs["mae"] = mae_reconstruct(mae.model, x, mae.mask_ratio, ctx.seed + start)
        for name, (pred, mask) in outputs.items():
            weight = torch.ones_like(x[:, :1]) if mask is None else mask  # (B, 1, T, T)
            err = ((pred.double() - x.double()) ** 2 * weight).sum(dim=(0, 2, 3))  # (C,)
            sums[name] = sums.get(name, 0) + err
            counts[name] = counts.get(name, 0.0) + float(weight.sum())
            if start == 0:
                sample[name] = pred[0].float().cpu().numpy()
                if mask is not None:
                    sample[f"{name}_mask"] = mask[0, 0].bool().cpu().numpy()
        if start == 0:
            sample["original"] = x[0].cpu().numpy()
    return {k: (sums[k] / counts[k]).cpu().numpy() for k in sums}, sample
