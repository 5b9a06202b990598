"""Stage pca-poc: the dissertation's proof of concept, as reconstruction checks.

1. PCA 32 -> ``pca.components`` bands fitted on random normalised training pixels; explained
   variance per component (and cumulative).
2. Reconstruction error per band (MSE in normalised units) on held-out tiles for (a) the
   linear PCA inverse and (b) a decoder trained from the PCA bands (``pca.decoder``: a small
   convolutional net, or a 3-channel ViT with a linear patch decoder as in the dissertation).
3. With ``pca.encoder`` naming an MAE encoder record: the 32-band MAE reconstruction check,
   the per-band error of the full MAE (encoder + decoder from ``train.pt`` beside the record)
   on its masked patches, on the same tiles.

Writes ``results/<pca.name>/{pca.json, metrics.json, reconstructions.npz}`` in one transaction.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from hsissl.config import Config, DataConfig, MAEConfig, PCAConfig
from hsissl.config_rules import refuse
from hsissl.data.loaders import TileBatches, bind
from hsissl.data.normalize import Normalizer
from hsissl.data.ohs import BAND_CENTRES_NM
from hsissl.data.shards import ShardDataset, SplitView
from hsissl.layout import METRICS, TRAIN_STATE, dataset_uri, result_key, storage_of
from hsissl.pca import PCA, fit_pca, make_decoder, project, reconstruct, sample_pixels
from hsissl.pretrain import checkpoint
from hsissl.pretrain.runtime import Runtime, setup
from hsissl.stages.results import PCAResult
from hsissl.storage import open_storage
from hsissl.tracking import stage_run

log = logging.getLogger(__name__)

EVAL_TILES = 256  # held-out tiles every reconstruction error is measured on
EVAL_SPLITS = ("va", "ts")  # first present is the held-out split; else tiles of "tr"


def run(cfg: Config) -> PCAResult:
    """Fit the PCA, train the decoder, run the optional MAE check; returns the metrics dict."""
    pc = cfg.pca
    rt = setup(cfg.pretrain.device, cfg.seed, cfg.pretrain.deterministic)
    dataset = ShardDataset(dataset_uri(cfg))
    check_bands(pc, dataset)
    normalizer = dataset.normalizer
    mae = load_mae(pc.encoder, dataset, rt) if pc.encoder else None  # fails early if unusable
    with stage_run(cfg, "pca-poc") as tracker:
        start = time.perf_counter()
        pixels = sample_pixels(dataset.split("tr"), normalizer, pc.fit_pixels, seed=cfg.seed)
        pca = fit_pca(pixels, pc.components)
        ratio = pca.explained_variance_ratio
        log.info(
            "PCA %d -> %d explains %.4f of the variance", pca.bands, pc.components, ratio.sum()
        )

        eval_view = _eval_view(dataset)
        eval_idx = _eval_indices(eval_view, cfg.seed)
        decoder, history = train_decoder(cfg, dataset.split("tr"), normalizer, pca, rt, tracker)
        errors, sample = reconstruction_errors(
            eval_view, eval_idx, normalizer, pca, decoder, mae, rt, cfg.seed, pc.batch_size
        )

        dataset_info = {"uri": dataset.uri, "fingerprint": dataset.manifest.get("fingerprint"),
                        "normalizer": normalizer.fingerprint}  # fmt: skip
        pca_record = pca.to_dict() | {
            "dataset": dataset_info,
            "fit_split": "tr",
            "fit_pixels": len(pixels),
            "seed": cfg.seed,
        }
        metrics = {
            "kind": "pca",
            "name": pc.name,
            "encoder": _encoder_info(pc.encoder, mae),
            "head": "pca",
            "dataset": dataset.uri,
            "normalizer": normalizer.fingerprint,
            "explained_variance": ratio.tolist(),
            "explained_variance_cumulative": np.cumsum(ratio).tolist(),
            "per_band_mse": {k: v.tolist() for k, v in errors.items()},
            "mean_mse": {k: float(v.mean()) for k, v in errors.items()},
            "band_centres_nm": list(BAND_CENTRES_NM[: pca.bands]),
            "eval_split": eval_view.name,
            "eval_tiles": len(eval_idx),
            "history": history,
            "config": asdict(pc),
            "seconds": time.perf_counter() - start,
        }
        _write(cfg, pca_record, metrics, sample)
        tracker.log_metrics(
            {f"explained_variance_{i + 1}": float(v) for i, v in enumerate(ratio)}
            | {f"mse_{k}": v for k, v in metrics["mean_mse"].items()}
        )
        tracker.log_dict(metrics, "metrics.json")
        tracker.log_dict(pca_record, "pca.json")
        tracker.set_tags({"normalizer": normalizer.fingerprint, "results": _results_uri(cfg)})
        tracker.name_after(_results_uri(cfg))
    return PCAResult(_results_uri(cfg), metrics["explained_variance"], metrics["mean_mse"])


def check_bands(pc: PCAConfig, dataset: ShardDataset) -> None:
    """Refuse more components than the dataset has bands (before any work is done); the
    config's own values were checked when it was loaded (``hsissl.config_rules``)."""
    bands = dataset.normalizer.bands
    if pc.components > bands:
        raise refuse("pca.components", pc.components, f"1..{bands} (its bands)",
                     f"dataset {dataset.uri}")  # fmt: skip


def _results_uri(cfg: Config) -> str:
    return storage_of(cfg).join(result_key(cfg.pca.name))


def _eval_view(dataset: ShardDataset) -> SplitView:
    for name in EVAL_SPLITS:
        if name in dataset.splits and len(dataset.split(name)):
            return dataset.split(name)
    return dataset.split("tr")  # e.g. real data ingested as one split


def _eval_indices(view: SplitView, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 1)  # + 1: not the PCA's fit sample
    return np.sort(rng.choice(len(view), size=min(EVAL_TILES, len(view)), replace=False))


def train_decoder(cfg: Config, view: SplitView, normalizer: Normalizer, pca: PCA, rt: Runtime,
                  tracker: Any) -> tuple[torch.nn.Module, list[dict[str, float]]]:  # fmt: skip
    """Train the ``pca.decoder`` (conv, or a 3-channel ViT) for ``pca.decoder_steps`` steps on
    random training tiles (MSE;
    AdamW, linear warm-up over the first 10 % of the steps, then ``pca.lr``)."""
    pc = cfg.pca
    decoder = make_decoder(pc.decoder, pca, pc.vit_model).to(rt.device)
    mean, comps = pca.tensors(rt.device)
    opt = torch.optim.AdamW(decoder.parameters(), lr=pc.lr, weight_decay=0.0)
    batches = TileBatches(view, pc.batch_size, seed=cfg.seed, drop_last=len(view) >= pc.batch_size,
                          workers=cfg.pretrain.loader_threads)  # fmt: skip
    history: list[dict[str, float]] = []
    step, log_every = 0, max(1, cfg.pretrain.log_every)
    warmup = max(1, pc.decoder_steps // 10)  # Adam's first steps move every weight by ~lr
    decoder.train()
    while step < pc.decoder_steps:
        for images, _ in batches:
            lr = pc.lr * min(1.0, (step + 1) / warmup)
            for group in opt.param_groups:
                group["lr"] = lr
            x = normalizer(images.to(rt.device, non_blocking=True))  # (B, C, T, T)
            loss = torch.nn.functional.mse_loss(decoder(project(x, mean, comps)), x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % log_every == 0 or step == pc.decoder_steps:
                history.append({"step": step, "loss": float(loss.detach()), "lr": lr})
                tracker.log_metrics({"decoder_loss": history[-1]["loss"]}, step=step)
            if step == pc.decoder_steps:
                break
    return decoder.eval(), history


@dataclass(frozen=True)
class MAECheck:
    """A full MAE (encoder + pixel decoder) restored for the reconstruction check."""

    model: torch.nn.Module  # hsissl.models.mae.MaskedAutoencoderViT, eval mode
    mask_ratio: float  # the ratio the run was trained with
    factory: str


def load_mae(uri: str, dataset: ShardDataset, rt: Runtime) -> MAECheck:
    """The full MAE of the run whose encoder record is ``uri``.

    The record holds only the encoder; the decoder lives in the run's resumable state
    ``train.pt`` beside it, rebuilt as the run's own MAERecipe from the config it saved.
    """
    from hsissl.pretrain.mae import MAERecipe

    _, normalizer, record = checkpoint.load_encoder(uri)
    if record.get("method") != "mae":
        raise ValueError(f"pca.encoder={uri}: a {record.get('method')!r} encoder record; "
                         "the 32-band reconstruction check needs an MAE run")  # fmt: skip
    bind(dataset, normalizer)  # refuses an MAE trained on differently normalised data
    parent = uri.rstrip("/").rpartition("/")[0]
    store = open_storage(parent)
    if not store.exists(TRAIN_STATE):
        raise FileNotFoundError(f"{store.join(TRAIN_STATE)}: no MAE training state beside "
                                f"{uri}; the check needs the MAE decoder")  # fmt: skip
    state = checkpoint.load(store, TRAIN_STATE)
    if state.get("step") != record.get("step"):
        raise ValueError(
            f"{store.join('train.pt')} is at step {state.get('step')} but {uri} "
            f"at step {record.get('step')}: not the same point of one run"
        )
    saved = state["config"]
    if saved["data"]["tile_size"] != dataset.manifest["tile_size"]:
        raise ValueError(f"pca.encoder={uri}: the MAE was trained on {saved['data']['tile_size']}"
                         f"-px tiles; dataset {dataset.uri} has {dataset.manifest['tile_size']}-px "
                         "tiles")  # fmt: skip
    cfg = Config()
    cfg.mae = _dataclass_from(MAEConfig, saved["mae"])
    cfg.data = _dataclass_from(DataConfig, saved["data"])
    recipe = MAERecipe(cfg)
    recipe.load_state_dict(state["recipe"])
    return MAECheck(recipe.model.to(rt.device).eval(), cfg.mae.mask_ratio, recipe.factory)


def _dataclass_from(cls: type, values: dict[str, Any]) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in known})


@torch.no_grad()
def reconstruction_errors(
    view: SplitView, indices: np.ndarray, normalizer: Normalizer, pca: PCA, decoder: torch.nn.Module,
    mae: MAECheck | None, rt: Runtime, seed: int, batch_size: int,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:  # fmt: skip
    """Per-band MSE (C,) of each reconstruction on the tiles ``indices``, and the first tile's
    reconstructions (C, T, T) for the report. The MAE error counts its masked pixels only."""
    mean, comps = pca.tensors(rt.device)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, float] = {}
    sample: dict[str, np.ndarray] = {}
    for start in range(0, len(indices), batch_size):
        images, _ = view.get(indices[start : start + batch_size])
        x = normalizer(torch.from_numpy(images).to(rt.device))  # (B, C, T, T)
        z = project(x, mean, comps)  # (B, K, T, T)
        outputs = {"pca": (reconstruct(z, mean, comps), None), "decoder": (decoder(z), None)}
        if mae is not None:
            outputs["mae"] = _mae_reconstruct(mae, x, seed + start, rt)
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


def _mae_reconstruct(
    mae: MAECheck, x: torch.Tensor, seed: int, rt: Runtime
) -> tuple[torch.Tensor, torch.Tensor]:
    """MAE reconstruction (B, C, T, T) with the visible patches pasted back, and its mask
    (B, 1, T, T), 1 = masked. Masks are seeded: every run checks the same patches."""
    model = mae.model
    with torch.random.fork_rng(devices=[rt.device] if rt.cuda else []):
        torch.manual_seed(seed)  # random_masking draws from the global generator
        latent, mask, ids_restore = model.forward_encoder(x, mae.mask_ratio)  # mask (B, L)
    pred = model.forward_decoder(latent, ids_restore).float()  # (B, L, p*p*C)
    if model.norm_pix_loss:  # predictions are per-patch standardised: undo with the target's stats
        target = model.patchify(x)
        mu, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mu
    p = model.patch_size
    mask_px = model.unpatchify(mask[..., None].expand(-1, -1, p * p * model.in_chans))[:, :1]
    return model.unpatchify(pred) * mask_px + x * (1 - mask_px), mask_px


def _encoder_info(uri: str, mae: MAECheck | None) -> dict[str, str]:
    if mae is None:
        return {"uri": "", "method": "none", "factory": ""}
    return {"uri": uri, "method": "mae", "factory": mae.factory}


def _write(cfg: Config, pca_record: dict, metrics: dict, sample: dict[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **sample)
    with storage_of(cfg).transaction(result_key(cfg.pca.name)) as tx:
        tx.put_bytes("pca.json", json.dumps(pca_record, indent=1).encode())
        tx.put_bytes("reconstructions.npz", buffer.getvalue())
        tx.commit({METRICS: json.dumps(metrics, indent=1).encode()})
