"""hsissl.methods: a pretraining method defined in this file and registered with the decorator is
configured (YAML section, rules), pretrained through the CLI, finetuned and reported end to end,
and the DAG and the multi-node job builder pick it up: no other file names it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from html import unescape
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import small_run_settings
from hsissl import cli, methods
from hsissl.config import ConfigError, OptimConfig, load_config
from hsissl.data.ohs import NUM_BANDS
from hsissl.layout import storage_of
from hsissl.models import create_model
from hsissl.pretrain import checkpoint
from hsissl.pretrain.recipe import Recipe
from hsissl.report.labels import method_label
from hsissl.stages import finetune, ingest, report

REPO = Path(__file__).resolve().parents[1]
NAME = "tinyrecon"
LABEL = "Tiny recon"


@dataclass
class TinyReconConfig(OptimConfig):
    mask_ratio: float = 0.5  # share of patches blanked in the input and scored


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, C*p*p), patches in the ViT's row-major token order."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


class TinyRecon(Recipe):
    """Blank random patches, predict their pixels from the ViT's patch tokens (linear decoder)."""

    method = NAME

    def __init__(self, cfg):
        super().__init__(cfg)
        self.factory = getattr(cfg, NAME).model or self.default_model()
        self.backbone = create_model(self.factory)
        p = self.backbone.patch_size
        self.decoder = nn.Linear(self.backbone.embed_dim, NUM_BANDS * p * p)
        self.mask_ratio = getattr(cfg, NAME).mask_ratio

    def forward(self, images: torch.Tensor, step: int, total: int):
        p = self.backbone.patch_size
        b, _, h, w = images.shape
        masks = torch.rand(b, (h // p) * (w // p)) < self.mask_ratio  # (B, L), True = blanked
        keep = (~masks).float().reshape(b, 1, h // p, w // p).to(images.device)
        keep = keep.repeat_interleave(p, 2).repeat_interleave(p, 3)  # (B, 1, H, W)
        tokens = self.backbone.forward_features(images * keep)  # (B, N, D)
        pred = self.decoder(tokens[:, self.backbone.num_prefix_tokens :])  # (B, L, C*p*p)
        target = patchify(images, p)
        scored = masks.to(images.device)
        loss = F.mse_loss(pred[scored], target[scored]) if scored.any() else pred.sum() * 0
        return loss, {"loss_recon": loss.detach()}

    def encoder(self) -> nn.Module:
        return self.backbone

    def build(self) -> dict:
        return {"factory": self.factory, "kwargs": {}, "attr": None}


@pytest.fixture(scope="module")
def tiny_method():
    """Registered for this module only (every other test sees the built-in three)."""
    methods.register(section=TinyReconConfig, default_model="vit_tiny_patch8_64", label=LABEL,
                     summary="pretrain a tiny masked-patch regressor (test)",
                     rules={"mask_ratio": (lambda v: 0.0 < v < 1.0, "a value in (0, 1)")},
                     )(TinyRecon)  # fmt: skip
    yield methods.get(NAME)
    methods.unregister(NAME)
    assert NAME not in methods.names()
    assert not hasattr(load_config(), NAME)


def overrides(run_dir: Path, **extra: object) -> list[str]:
    base = small_run_settings(run_dir) | {f"{NAME}.lr": 1e-3, "report.scenes": 1}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def test_its_section_is_a_config_section_with_its_rules(tiny_method, tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text(f"{NAME}:\n  mask_ratio: 0.3\n  lr: 0.002\n")
    cfg = load_config(preset, [f"{NAME}.warmup_fraction=0.2"])
    assert getattr(cfg, NAME) == TinyReconConfig(mask_ratio=0.3, lr=0.002, warmup_fraction=0.2)
    assert asdict(cfg)[NAME]["mask_ratio"] == 0.3  # saved with checkpoints and resolved configs
    with pytest.raises(ConfigError, match=rf"{NAME}.mask_ratio=1.5.*\(0, 1\)"):
        load_config(None, [f"{NAME}.mask_ratio=1.5"])
    with pytest.raises(ConfigError, match=rf"{NAME}.lr=-1.0"):  # OptimConfig's rules apply too
        load_config(None, [f"{NAME}.lr=-1"])
    with pytest.raises(ConfigError, match=rf"unknown config key '{NAME}.typo'"):
        load_config(None, [f"{NAME}.typo=1"])
    assert tiny_method.stage in cli.stages() and method_label(NAME) == LABEL


def test_pretrained_finetuned_and_reported_end_to_end(tiny_method, tmp_path):
    run_dir = tmp_path / "run"
    ingest.run(load_config(REPO / "configs" / "tiny.yaml", overrides(run_dir)))
    assert cli.main([tiny_method.stage, "--config", str(REPO / "configs" / "tiny.yaml"),
                     *overrides(run_dir)]) == 0  # fmt: skip
    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides(run_dir))
    store = storage_of(cfg)
    encoder_uri = store.join(f"checkpoints/{NAME}/encoder.pt")
    record = checkpoint.load(store, f"checkpoints/{NAME}/encoder.pt")
    assert record["method"] == NAME and record["step"] == 4
    assert record["build"] == {"factory": "vit_tiny_patch8_64", "kwargs": {}, "attr": None}
    assert record["config"][NAME]["mask_ratio"] == 0.5
    history = json.loads(store.get_bytes(f"checkpoints/{NAME}/history.json"))
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert all(h["loss_recon"] > 0 for h in history)

    result = finetune.run(load_config(REPO / "configs" / "tiny.yaml",
                                      overrides(run_dir, **{"finetune.encoder": encoder_uri})))  # fmt: skip
    metrics = json.loads(store.get_bytes(f"results/finetune-{NAME}-linear/metrics.json"))
    assert result.name == f"finetune-{NAME}-linear" and metrics["encoder"]["method"] == NAME
    assert 0.0 <= metrics["scene"]["miou"] <= 1.0

    out = report.run(cfg)
    assert out.runs == [f"finetune-{NAME}-linear"] and out.encoders == [NAME]
    page = store.get_bytes("reports/report/report.html").decode()
    assert f"{LABEL} = checkpoints/{NAME}" in unescape(page)  # the attention rows' label
    assert f"finetune-{NAME}-linear" in store.get_bytes("reports/report/summary.md").decode()


def test_the_dag_and_the_multi_node_jobs_pick_it_up(tiny_method, tmp_path):
    from kfp import compiler

    from components.jobs.pytorchjob import build_pytorchjob
    from pipelines.dag import build_pipeline, stage_names

    assert tiny_method.stage in stage_names()
    path = tmp_path / "dag.yaml"
    compiler.Compiler().compile(build_pipeline(), str(path))
    spec = path.read_text()
    assert f"comp-{tiny_method.stage}:" in spec and f"run_{NAME}:" in spec
    assert f'runtime.pretrain(\\"{NAME}\\"' in spec  # the component's code in the pod
    job = build_pytorchjob(tiny_method.stage, [f"{NAME}.lr=0.01"], nodes=2, gpus_per_node=1,
                           name="tiny", run_id="r1")  # fmt: skip
    master = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert master["command"][3] == tiny_method.stage
    assert f"pretrain.name={NAME}-r1" in master["command"]
