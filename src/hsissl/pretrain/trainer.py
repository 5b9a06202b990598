"""The one training loop every pretraining method runs (MAE, DINOv2, SS-ViT).

AdamW (fused on CUDA) with warmup + cosine schedule, bf16 autocast on CUDA, optional
torch.compile of the recipe's networks (``Recipe.compile_modules``), gradient clipping, DDP
under torchrun, checkpoints every N steps with everything needed for an exact resume (weights,
optimiser, step, RNG states, loader position, Normalizer), a k-NN probe of the frozen
encoder (on labelled validation tiles, or the caller's: evaluate-real probes labelled pixels)
from the untrained encoder on, and MLflow logging.

SIGTERM (pod deletion, preemption) and Ctrl-C stop the loop after the current step: the train
state is saved, the MLflow run ends KILLED and ``KeyboardInterrupt("stopped by SIGTERM at step
N; checkpoint saved")`` reaches the CLI (exit 130, rerun to resume). A second signal acts at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from hsissl import registry
from hsissl.config import LR_REFERENCE_BATCH, Config, ConfigError, OptimConfig
from hsissl.data.loaders import TileBatches
from hsissl.data.prefetch import DeviceBatches
from hsissl.data.shards import ShardDataset
from hsissl.layout import ENCODER, HISTORY, TRAIN_STATE, checkpoint_key, dataset_uri, storage_of
from hsissl.pretrain import checkpoint, knn
from hsissl.pretrain.recipe import Recipe, set_checkpoint_blocks
from hsissl.pretrain.runtime import Runtime, autocast, rng_state, set_rng_state, setup
from hsissl.storage import Lease
from hsissl.tracking import stage_run

log = logging.getLogger(__name__)
# (section, key) a resumed run must share with its checkpoint besides the method's own section.
RESUME_FIXED = (("pretrain", "batch_size"), ("data", "tile_size"))
# A probe of the representation during training: the encoder (eval mode, no grad) -> logged
# metrics, e.g. {"knn_pixel_miou": 0.41}; the trainer's own is the tile k-NN ({"knn_acc": ...}).
Probe = Callable[[torch.nn.Module], dict[str, float]]


def _same(a: Any, b: Any) -> bool:
    """Equal settings; floats to 1e-9 relative (a rate scaled by the batch may differ in ulps)."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9)
    return a == b


def cosine_lr(step: int, total: int, opt: OptimConfig, global_batch: int) -> float:
    """Linear warmup to ``opt.scaled_lr(global_batch)``, then cosine decay to ``opt.min_lr``."""
    peak = opt.scaled_lr(global_batch)
    warmup = int(opt.warmup_fraction * total)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return opt.min_lr + 0.5 * (peak - opt.min_lr) * (1 + math.cos(math.pi * progress))


class StopSignals:
    """SIGTERM/SIGINT as a stop request (``requested``: the signal's name) that the loop
    honours at a step boundary, so the checkpoint it saves is the exact current state."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested: str | None = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopSignals]:
        """Handle the signals while the block runs (main thread only: Python delivers signals
        there). The first signal puts the previous handlers back, so a second one interrupts
        at once (KeyboardInterrupt, or termination for SIGTERM); they are back after the block
        in any case. Signals that were ignored (SIG_IGN) or set outside Python stay as they were."""
        self.requested = None
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.getsignal(sig) for sig in self.SIGNALS}
        ours = {sig: h for sig, h in previous.items() if h not in (signal.SIG_IGN, None)}

        def restore() -> None:
            for sig, handler in ours.items():
                signal.signal(sig, handler)

        def request_stop(signum: int, frame: object) -> None:
            self.requested = signal.Signals(signum).name
            restore()

        for sig in ours:
            signal.signal(sig, request_stop)
        try:
            yield self
        finally:
            restore()


class Trainer:
    def __init__(
        self, cfg: Config, recipe_cls: type[Recipe], stage: str, probe: Probe | None = None
    ):
        self.cfg, self.stage, self.pc = cfg, stage, cfg.pretrain
        self.probe = probe
        self.method = recipe_cls.method
        self.opt_cfg: OptimConfig = getattr(cfg, self.method)
        self.rt: Runtime = setup(self.pc.device, cfg.seed, self.pc.deterministic)
        self.dataset = ShardDataset(dataset_uri(cfg))
        self.normalizer = self.dataset.normalizer
        self.loader = TileBatches(self.dataset.split("tr"), self.pc.batch_size, seed=cfg.seed,
                                  rank=self.rt.rank, world_size=self.rt.world_size,
                                  workers=self.pc.loader_threads)  # fmt: skip
        self.total = self.pc.max_steps or max(1, math.ceil(self.pc.epochs * len(self.loader)))
        # the learning-rate scaling rule counts every process's batch (torchrun: world size)
        self.global_batch = self.pc.batch_size * self.rt.world_size
        self.recipe = recipe_cls(cfg).to(self.rt.device)
        set_checkpoint_blocks(self.recipe, self.pc.checkpoint_blocks)
        self.optimizer = torch.optim.AdamW(
            self.recipe.param_groups(self.opt_cfg.weight_decay),
            lr=self.opt_cfg.scaled_lr(self.global_batch),
            betas=tuple(self.opt_cfg.betas), fused=self.rt.cuda,
        )  # fmt: skip
        self.store = storage_of(cfg)
        self.ckpt_name = self.pc.name or self.method  # its checkpoint folder (hsissl.layout)
        self.prefix = checkpoint_key(self.ckpt_name)
        self.step = 0
        self.loader_state: dict[str, Any] | None = None  # the loader as of the last batch used
        self.history: list[dict[str, float]] = []  # logged metrics of this process (for reports)
        self.last_probe: tuple[int, dict[str, float]] = (
            -1,
            {},
        )  # (step, metrics) of the last probe
        self.stop = StopSignals()
        self.lease: Lease | None = None

    # -- checkpoints ------------------------------------------------------------------
    def save_train_state(self) -> None:
        if not self.rt.is_main:
            return
        state = {
            "format": checkpoint.TRAIN_FORMAT,
            "method": self.method,
            "step": self.step,
            "recipe": self.recipe.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "loader": self.loader_state or self.loader.state_dict(),
            "rng": rng_state(),
            "normalizer": self.normalizer.to_dict(),
            "config": asdict(self.cfg),
            "lr_reference_batch": LR_REFERENCE_BATCH,  # its lr is a base rate (the scaling rule)
        }
        self._commit(TRAIN_STATE, state)

    def _commit(self, name: str, payload: dict[str, Any]) -> str:
        """One checkpoint commit: ``name`` and the loss history, the other files carried over
        from the previous version (hsissl.storage.commit: a crash never loses the last one)."""
        with self.store.transaction(self.prefix, carry=True, lease=self.lease) as tx:
            torch.save(payload, tx.path(name))
            tx.done(name)
            tx.commit({HISTORY: self._history_bytes()})
        return self.store.join(checkpoint_key(self.ckpt_name, name))

    def maybe_resume(self) -> bool:
        key = checkpoint_key(self.ckpt_name, TRAIN_STATE)
        if not self.store.exists(key):
            return False
        state = checkpoint.load(self.store, key, map_location=self.rt.device)
        if state.get("method") != self.method:
            raise ConfigError(
                f"{self.store.join(key)} holds a {state.get('method')} training state, not "
                f"{self.method}: give this pretraining its own pretrain.name"
            )
        changed = self._changed_settings(state.get("config", {}), "lr_reference_batch" in state)
        if changed:
            raise ConfigError(
                f"{self.store.join(key)} was trained with other settings ({', '.join(changed)}); "
                "resume with the same settings, or start a new line with pretrain.name=<new name>"
            )
        self.normalizer.check(
            state["normalizer"]["fingerprint"], f"checkpoint {self.store.join(key)}"
        )
        self.recipe.load_state_dict(state["recipe"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        self.step = state["step"]
        log.info("resumed %s from step %d (%s)", self.method, self.step, self.store.join(key))
        return True

    def _changed_settings(self, saved: dict[str, Any], base_lr: bool = True) -> list[str]:
        """``key: saved -> now`` for every setting that a resumed run must keep: the method's
        section, and the batch and tile size the loader position and schedule depend on. The
        length (max_steps, epochs), logging, checkpoint interval and device may change.
        A state saved before the learning-rate scaling rule (``base_lr`` False) holds the peak
        rate itself, so its ``lr`` is compared with this run's scaled rate."""
        now = asdict(self.cfg)
        if not base_lr:
            now[self.method]["lr"] = self.opt_cfg.scaled_lr(self.global_batch)
        keys = [(self.method, k) for k in asdict(self.opt_cfg)] + list(RESUME_FIXED)
        changed = []
        for section, k in keys:
            before = saved.get(section, {})
            if k in before and not _same(before[k], now[section][k]):
                changed.append(f"{section}.{k}: {before[k]!r} -> {now[section][k]!r}")
        return changed

    def save_encoder(self) -> str:
        record = checkpoint.encoder_record(
            self.recipe.encoder(), self.recipe.build(), self.normalizer, self.method,
            {"uri": self.dataset.uri, "fingerprint": self.normalizer.fingerprint},
            asdict(self.cfg), self.step,
        )  # fmt: skip
        return self._commit(ENCODER, record)

    def _history_bytes(self) -> bytes:
        """Loss curves for reports, merged with those of earlier (resumed) processes."""
        key = checkpoint_key(self.ckpt_name, HISTORY)
        earlier = json.loads(self.store.get_bytes(key)) if self.store.exists(key) else []
        mine = {int(h["step"]) for h in self.history}
        merged = [h for h in earlier if int(h["step"]) not in mine] + self.history
        return json.dumps(sorted(merged, key=lambda h: h["step"])).encode()

    # -- probe ------------------------------------------------------------------------
    def knn_probe(self) -> dict[str, float]:
        """The caller's probe, else the tile k-NN (bank from tr, queries from va); {} when
        there is neither (no va split or ``pretrain.knn_tiles`` 0)."""
        if self.probe is None and ("va" not in self.dataset.splits or self.pc.knn_tiles <= 0):
            return {}
        was_training = self.recipe.training
        self.recipe.eval()
        with torch.no_grad(), autocast(self.rt, self.pc.amp):
            metrics = (
                self.probe(self.recipe.encoder()) if self.probe else {"knn_acc": self._tile_knn()}
            )
        self.recipe.train(was_training)
        return metrics

    def _tile_knn(self) -> float:
        bank = knn.sample(self.dataset.split("tr"), self.pc.knn_tiles, seed=1)
        queries = knn.sample(self.dataset.split("va"), self.pc.knn_tiles, seed=2)
        return knn.knn_accuracy(self.recipe.embed, self.normalizer, bank, queries, self.pc.knn_k,
                                self.rt.device)  # fmt: skip

    # -- loop -------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train to ``self.total`` steps (resuming a saved state); a stop signal ends it early
        with a checkpoint and KeyboardInterrupt (module doc)."""
        # The main rank owns checkpoints/<name> for the whole run: a second run of the same
        # name fails at once instead of interleaving checkpoints with this one.
        lease = Lease(self.store, self.prefix) if self.rt.is_main else contextlib.nullcontext()
        with self.stop.installed(), lease as held:
            self.lease = held
            return self._fit()

    def _fit(self) -> dict[str, Any]:
        resumed = self.maybe_resume()
        if self.pc.compile:  # networks one by one: the whole step would graph-break
            self.recipe.compile_modules(**self.compile_options())
        model: torch.nn.Module = self.recipe
        if self.rt.world_size > 1:
            model = DistributedDataParallel(
                model, device_ids=[self.rt.device.index] if self.rt.cuda else None
            )
        tracked = stage_run(self.cfg, self.stage) if self.rt.is_main else contextlib.nullcontext()
        with tracked as tracker:
            if tracker is not None:
                tracker.set_tags({"method": self.method, "resumed_from_step": str(self.step) if resumed else "0",
                                  "normalizer": self.normalizer.fingerprint})  # fmt: skip
            metrics = self._loop(model, tracker)
            encoder_uri = self.save_encoder() if self.rt.is_main else ""
            if tracker is not None:
                tracker.set_tags({"encoder_uri": encoder_uri})
                tracker.log_params({"encoder_uri": encoder_uri})
                registry.register_encoder(tracker, self.cfg, self.method, encoder_uri,
                                          self.normalizer.fingerprint, self.step,
                                          self.dataset.uri)  # fmt: skip
                tracker.name_after(encoder_uri)
                tracker.log_dict({"encoder_uri": encoder_uri, "build": self.recipe.build(),
                                  "normalizer": self.normalizer.to_dict(), "metrics": metrics}, "encoder.json")  # fmt: skip
        return {
            "encoder_uri": encoder_uri,
            "steps": self.step,
            "metrics": metrics,
            "resumed": resumed,
        }

    def compile_options(self) -> dict[str, Any]:
        """torch.compile options for the recipe: CUDA graphs where the config asks for them and
        the recipe's shapes are static (``Recipe.static_shapes``)."""
        if not self.pc.cuda_graphs:
            return {}
        if not self.recipe.static_shapes:
            log.warning("pretrain.cuda_graphs: %s changes shapes every step; not captured",
                        self.method)  # fmt: skip
            return {}
        return {"mode": "reduce-overhead"}

    def train_step(
        self, model: torch.nn.Module, x: torch.Tensor, lr: float
    ) -> tuple[torch.Tensor, dict]:
        """Forward, backward, clip and optimiser step on one normalised batch (B, C, H, W)."""
        with autocast(self.rt, self.pc.amp):
            loss, logs = model(
                x, self.step, self.total
            )  # logs: detached tensors (no GPU sync here)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.opt_cfg.clip_grad > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(
                self.recipe.parameters(), self.opt_cfg.clip_grad
            )
            logs["grad_norm"] = grad_norm.detach()
        self.optimizer.step()
        return loss, logs

    def _loop(self, model: torch.nn.Module, tracker: Any) -> dict[str, float]:
        try:
            with DeviceBatches(self.loader, self.normalizer, self.rt.device) as batches:
                return self._steps(model, tracker, iter(batches))
        finally:  # the prefetch thread read ahead: put the loader where training stopped
            if self.loader_state is not None:
                self.loader.load_state_dict(self.loader_state)

    def _steps(self, model: torch.nn.Module, tracker: Any, batches: Iterator) -> dict[str, float]:
        bar = tqdm(total=self.total, initial=self.step, desc=f"pretrain-{self.method}", unit="step",
                   disable=not self.rt.is_main)  # fmt: skip
        window_start, window_images = time.perf_counter(), 0
        last: dict[str, float] = {}
        if self.pc.knn_every and self.step == 0 and self.rt.is_main:  # the untrained encoder
            self._record_knn(self.knn_probe(), tracker)
        self.recipe.train()
        while self.step < self.total:
            lr = cosine_lr(self.step, self.total, self.opt_cfg, self.global_batch)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            x, self.loader_state = next(batches)  # (B, C, H, W) float32, normalised
            loss, logs = self.train_step(model, x, lr)
            logs |= self.recipe.after_step(self.step, self.total)
            self.step += 1
            window_images += len(x) * self.rt.world_size
            bar.update(1)
            if self.step % self.pc.log_every == 0 or self.step == self.total:
                elapsed = time.perf_counter() - window_start
                last = {
                    "loss": float(loss.detach()),
                    "lr": lr,
                    "img_per_s": window_images / max(elapsed, 1e-9),
                }
                last |= {k: float(v) for k, v in logs.items()}
                if not math.isfinite(last["loss"]):
                    raise FloatingPointError(f"{self.method} step {self.step}: loss is {last['loss']} "
                                             f"(lr {lr:.2e}); lower the lr or check the data")  # fmt: skip
                bar.set_postfix(loss=f"{last['loss']:.4f}", img_s=f"{last['img_per_s']:.0f}")
                self.history.append({"step": self.step} | last)
                if tracker is not None:
                    tracker.log_metrics(last, step=self.step)
                window_start, window_images = time.perf_counter(), 0
            if self.pc.knn_every and self.step % self.pc.knn_every == 0 and self.rt.is_main:
                self._record_knn(self.knn_probe(), tracker)
            saved = self.step % self.pc.ckpt_every == 0 or self.step == self.total
            if saved:
                self.save_train_state()
            if self.stop.requested:
                bar.close()
                self._stop_here(saved)
        bar.close()
        if self.rt.is_main:
            step, metrics = self.last_probe
            if step != self.step:  # the loop did not just probe this step
                metrics = self.knn_probe()
                self._record_knn(metrics, tracker)
            last |= metrics
        return last

    def _record_knn(self, metrics: dict[str, float], tracker: Any) -> None:
        """The probe's metrics at this step, in the history (the report plots their rise) and
        MLflow."""
        self.last_probe = (self.step, metrics)
        if not metrics:
            return
        if self.history and self.history[-1]["step"] == self.step:
            self.history[-1] |= metrics
        else:
            self.history.append({"step": self.step} | metrics)
        if tracker is not None:
            tracker.log_metrics(metrics, step=self.step)

    def _stop_here(self, saved: bool) -> None:
        """Save the train state at this step (unless just saved) and raise KeyboardInterrupt;
        start_run marks the MLflow run KILLED on the way out."""
        if not saved:
            self.save_train_state()
        message = f"stopped by {self.stop.requested} at step {self.step}; checkpoint saved"
        if self.rt.is_main:
            log.warning(
                "%s to %s", message, self.store.join(checkpoint_key(self.ckpt_name, TRAIN_STATE))
            )
        raise KeyboardInterrupt(message)


def pretrain(
    cfg: Config, recipe_cls: type[Recipe], stage: str, probe: Probe | None = None
) -> dict[str, Any]:
    result = Trainer(cfg, recipe_cls, stage, probe).fit()
    log.info("%s: %s", stage, json.dumps({k: v for k, v in result.items() if k != "metrics"}))
    return result
