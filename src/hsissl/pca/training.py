"""Training of a PCA band decoder on random training tiles."""

from __future__ import annotations

import torch

from hsissl.config import PCAConfig
from hsissl.data.loaders import TileBatches
from hsissl.data.normalize import Normalizer
from hsissl.data.shards import SplitView
from hsissl.pca.basis import PCA, project
from hsissl.pca.decoders import make_decoder
from hsissl.pretrain.context import StageContext


def train_decoder(pc: PCAConfig, view: SplitView, normalizer: Normalizer, pca: PCA,
                  ctx: StageContext) -> tuple[torch.nn.Module, list[dict[str, float]]]:  # fmt: skip
    """Train the ``pca.decoder`` (conv, or a 3-channel ViT) for ``pca.decoder_steps`` steps on
    random training tiles (MSE; AdamW, linear warm-up over the first 10 % of the steps, then
    ``pca.lr``); ``ctx.log`` gets ``decoder_loss`` every ``ctx.log_every`` steps."""
    decoder = make_decoder(pc.decoder, pca, pc.vit_model).to(ctx.device)
    mean, comps = pca.tensors(ctx.device)
    opt = torch.optim.AdamW(decoder.parameters(), lr=pc.lr, weight_decay=0.0)
    batches = TileBatches(view, pc.batch_size, seed=ctx.seed, drop_last=len(view) >= pc.batch_size,
                          workers=ctx.loader_threads)  # fmt: skip
    history: list[dict[str, float]] = []
    step, log_every = 0, max(1, ctx.log_every)
    warmup = max(1, pc.decoder_steps // 10)  # Adam's first steps move every weight by ~lr
    decoder.train()
    while step < pc.decoder_steps:
        for images, _ in batches:
            lr = pc.lr * min(1.0, (step + 1) / warmup)
            for group in opt.param_groups:
                group["lr"] = lr
            x = normalizer(images.to(ctx.device, non_blocking=True))  # (B, C, T, T)
            loss = torch.nn.functional.mse_loss(decoder(project(x, mean, comps)), x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % log_every == 0 or step == pc.decoder_steps:
                history.append({"step": step, "loss": float(loss.detach()), "lr": lr})
                if ctx.log is not None:
                    ctx.log({"decoder_loss": history[-1]["loss"]}, step)
            if step == pc.decoder_steps:
                break
    return decoder.eval(), history
