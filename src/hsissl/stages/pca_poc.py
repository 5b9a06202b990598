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

import io
import json
import logging
import time
from dataclasses import asdict

import numpy as np

from hsissl.config import Config, PCAConfig
from hsissl.config_rules import refuse
from hsissl.data.ohs import BAND_CENTRES_NM
from hsissl.data.shards import ShardDataset
from hsissl.layout import METRICS, dataset_uri, result_key
from hsissl.pca import fit_pca, sample_pixels
from hsissl.pca.check import eval_indices, eval_view, load_mae_check, reconstruction_errors
from hsissl.pca.training import train_decoder
from hsissl.pretrain.context import context_of
from hsissl.pretrain.reconstruction import TrainedMAE
from hsissl.stages.results import PCAResult
from hsissl.storage import Storage
from hsissl.tracking import stage_run

log = logging.getLogger(__name__)


def run(cfg: Config) -> PCAResult:
    """Fit the PCA, train the decoder, run the optional MAE check; returns the metrics dict."""
    pc = cfg.pca
    ctx = context_of(cfg)
    dataset = ShardDataset(dataset_uri(cfg))
    check_bands(pc, dataset)
    normalizer = dataset.normalizer
    # fails early if unusable
    mae = load_mae_check(pc.encoder, dataset, ctx.device) if pc.encoder else None
    with stage_run(cfg, "pca-poc") as tracker:
        ctx = ctx.logging_to(tracker.log_metrics)
        start = time.perf_counter()
        pixels = sample_pixels(dataset.split("tr"), normalizer, pc.fit_pixels, seed=ctx.seed)
        pca = fit_pca(pixels, pc.components)
        ratio = pca.explained_variance_ratio
        log.info(
            "PCA %d -> %d explains %.4f of the variance", pca.bands, pc.components, ratio.sum()
        )

        view = eval_view(dataset)
        eval_idx = eval_indices(view, ctx.seed)
        decoder, history = train_decoder(pc, dataset.split("tr"), normalizer, pca, ctx)
        errors, sample = reconstruction_errors(
            view, eval_idx, normalizer, pca, decoder, mae, ctx, pc.batch_size
        )

        dataset_info = {"uri": dataset.uri, "fingerprint": dataset.manifest.get("fingerprint"),
                        "normalizer": normalizer.fingerprint}  # fmt: skip
        pca_record = pca.to_dict() | {
            "dataset": dataset_info,
            "fit_split": "tr",
            "fit_pixels": len(pixels),
            "seed": ctx.seed,
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
            "eval_split": view.name,
            "eval_tiles": len(eval_idx),
            "history": history,
            "config": asdict(pc),
            "seconds": time.perf_counter() - start,
        }
        _write(ctx.store, pc.name, pca_record, metrics, sample)
        tracker.log_metrics(
            {f"explained_variance_{i + 1}": float(v) for i, v in enumerate(ratio)}
            | {f"mse_{k}": v for k, v in metrics["mean_mse"].items()}
        )
        tracker.log_dict(metrics, "metrics.json")
        tracker.log_dict(pca_record, "pca.json")
        results_uri = ctx.store.join(result_key(pc.name))
        tracker.set_tags({"normalizer": normalizer.fingerprint, "results": results_uri})
        tracker.name_after(results_uri)
    return PCAResult(results_uri, metrics["explained_variance"], metrics["mean_mse"])


def check_bands(pc: PCAConfig, dataset: ShardDataset) -> None:
    """Refuse more components than the dataset has bands (before any work is done); the
    config's own values were checked when it was loaded (``hsissl.config_rules``)."""
    bands = dataset.normalizer.bands
    if pc.components > bands:
        raise refuse("pca.components", pc.components, f"1..{bands} (its bands)",
                     f"dataset {dataset.uri}")  # fmt: skip


def _encoder_info(uri: str, mae: TrainedMAE | None) -> dict[str, str]:
    if mae is None:
        return {"uri": "", "method": "none", "factory": ""}
    return {"uri": uri, "method": "mae", "factory": mae.factory}


def _write(store: Storage, name: str, pca_record: dict, metrics: dict,
           sample: dict[str, np.ndarray]) -> None:  # fmt: skip
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **sample)
    with store.transaction(result_key(name)) as tx:
        tx.put_bytes("pca.json", json.dumps(pca_record, indent=1).encode())
        tx.put_bytes("reconstructions.npz", buffer.getvalue())
        tx.commit({METRICS: json.dumps(metrics, indent=1).encode()})
