"""scripts/bench_train.py runs without the optional packages, and the recipes compile whole.

The benchmark is meant for lent GPU machines that have torch, timm, numpy, scipy and pyyaml but
not rasterio, minio, mlflow or segmentation-models-pytorch: the subprocess tests block those
imports and run the tiny CPU variant for a step or two.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hsissl import tracking
from hsissl.config import load_config
from hsissl.data import geotiff
from hsissl.pretrain.dinov2 import DINOv2Recipe, host_free_logs
from hsissl.pretrain.mae import MAERecipe
from hsissl.pretrain.recipe import compile_blocks
from hsissl.pretrain.ssvit import SSViTRecipe
from hsissl.storage import open_storage

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "scripts" / "bench_train.py"
BLOCKED = ("rasterio", "minio", "mlflow", "segmentation_models_pytorch")
# sys.modules[name] = None makes every `import name` (and `from name import x`) raise ImportError.
SHIM = (
    "import runpy, sys\n"
    f"for name in {BLOCKED!r}:\n"
    "    sys.modules[name] = None\n"
    f"sys.argv = [{str(BENCH)!r}] + sys.argv[1:]\n"
    f"runpy.run_path({str(BENCH)!r}, run_name='__main__')\n"
)


def run_bench(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-c", SHIM, "--data", str(tmp_path / "data"), "--json", str(out), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def test_bench_runs_without_rasterio_minio_mlflow_smp(tmp_path: Path) -> None:
    """All three methods and the loader, tiny, one step each; an unknown compile backend makes
    every method fall back to eager (what the GPU script relies on when compiling fails)."""
    proc, result = run_bench(tmp_path, "--steps", "1", "--warmup", "1", "--loader-batches", "2",
                             "--batch", "4", "--compile", "--compile-backend", "no-such-backend",
                             "--profile", str(tmp_path / "profiles"), "--checkpoint-blocks",
                             "ssvit=1", "--reference", "--no-compile-reference")  # fmt: skip
    out = proc.stdout
    assert out.startswith("device: CPU ")
    for field in ("model ", " img/s", "end-to-end", "MFU n/a", "peak memory", "loader ", "tiles/s",
                  "FALLING BACK TO EAGER"):  # fmt: skip
        assert out.count(field) >= 3, (field, out)
    assert [r["method"] for r in result["rows"]] == ["mae", "dinov2", "ssvit", "reference"]
    assert result["device"].startswith("CPU") and result["failed"] == {}
    assert result["peak_flops"] is None  # nothing to measure on a CPU
    reference = result["rows"].pop()
    assert reference["model_img_per_s"] > 0 and reference["gflop_per_image_fwd_bwd"] > 0
    assert "timm VisionTransformer" in reference["model"] and "reference " in out
    assert [r["checkpoint_blocks"] for r in result["rows"]] == [0, 0, 1]
    for row in result["rows"]:
        assert row["end_to_end_serial_img_per_s"] > 0 and row["end_to_end_over_model"] > 0
        assert row["model_beside_loader_img_per_s"] > 0
        assert row["host_syncs_per_step"] is None and row["host_sync_sites"] == []  # CUDA only
        # 308,000 tiles x the preset's 100 epochs at the measured end-to-end rate
        expected = 308_000 * 100 / row["end_to_end_img_per_s"] / 3600
        assert row["full_run_hours"] == pytest.approx(expected) and row["full_run_epochs"] == 100
        assert row["batch"] == 4 and row["model"].endswith("_tiny_patch8_64")
        assert row["model_img_per_s"] > 0 and row["end_to_end_img_per_s"] > 0
        assert row["loader_tiles_per_s"] > 0 and row["peak_mem_gib"] > 0
        assert row["gflop_per_image_fwd_bwd"] > 0 and row["mfu"] is None  # no peak on a CPU
        assert row["compiled"] is False and "no-such-backend" in row["compile_error"]
        # --profile: the top ops of 3 steps, by self time (no GPU: no busy fraction)
        table = Path(row["profile"]).read_text()
        assert row["profile"].endswith(f"profile-{row['method']}.txt") and "aten::mm" in table
        assert row["step_ms"] > 0 and row["gpu_busy"] is None and "profile_error" not in row
    # The shards stay in --data for the next run (the GPU script shares them across methods).
    store = open_storage(tmp_path / "data" / "artifacts")
    assert store.exists("datasets/bench/manifest.json")


def test_optional_features_name_their_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """The imports are lazy: the modules load without the packages, and the feature that needs
    one says which package is missing."""
    for name in BLOCKED:
        monkeypatch.setitem(sys.modules, name, None)
    tracking._mlflow.cache_clear()  # earlier successful imports are cached
    geotiff._rasterio.cache_clear()
    try:
        with pytest.raises(ImportError, match="tracking.*needs the 'mlflow' package"):
            tracking.start_run(load_config(), "bench", Path("unused")).__enter__()
        with pytest.raises(ImportError, match="s3:// storage needs the 'minio' package"):
            open_storage("s3://bucket/prefix")
        with pytest.raises(ImportError, match="GeoTIFF .* needs the 'rasterio' package"):
            geotiff.default_transform()
    finally:
        tracking._mlflow.cache_clear()
        geotiff._rasterio.cache_clear()


def load_bench_module():
    spec = importlib.util.spec_from_file_location("bench_train", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_batch_flags() -> None:
    bench = load_bench_module()
    parse = bench.parse_per_method
    assert parse(["512", "dinov2=256"], "--batch", 2) == {"*": 512, "dinov2": 256}
    assert parse(["reference=64"], "--batch", 2) == {"reference": 64}
    assert parse(["ssvit=0"], "--checkpoint-blocks", 0) == {"ssvit": 0}
    with pytest.raises(SystemExit, match="unknown method 'dino'"):
        parse(["dino=8"], "--batch", 2)
    with pytest.raises(SystemExit, match="--batch mae=1: expected N or METHOD=N with N >= 2"):
        parse(["mae=1"], "--batch", 2)
    assert bench.checkpoint_candidates(0, fit=False) == [0]
    assert bench.checkpoint_candidates(0, fit=True) == [0, 2, 4, 6, 8, 10, 12]
    assert bench.batch_candidates(512, fit=False) == [512]
    assert bench.batch_candidates(512, fit=True)[:5] == [512, 384, 256, 192, 128]
    assert bench.batch_candidates(512, fit=True)[-1] == 8
    assert bench.batch_candidates(4, fit=True) == [4]  # below 8: the batch itself, not nothing


# -- compile: every network is one full graph ---------------------------------------------------
TINY = {"mae": "mae_vit_tiny_patch8_64", "dinov2": "dinov2_vit_tiny_patch8_64",
        "ssvit": "ssvit_tiny_patch8_64"}  # fmt: skip


def tiny_recipe(cls: type):
    """A tiny recipe with small DINO heads and no dropout (compiled and eager then agree)."""
    m = cls.method
    overrides = [f"{m}.model={TINY[m]}", f"{m}.drop_rate=0"]
    if m != "mae":
        overrides += [f"{m}.out_dim=64", f"{m}.head_hidden=32", f"{m}.head_bottleneck=16",
                      f"{m}.n_local_crops=2"]  # fmt: skip
    torch.manual_seed(0)
    return cls(load_config(None, overrides))


@pytest.mark.parametrize("cls", [DINOv2Recipe, SSViTRecipe])
def test_student_backbone_and_head_compile_without_graph_breaks(cls: type) -> None:
    recipe = tiny_recipe(cls)
    backbone, head = recipe.student["backbone"], recipe.student["head"]
    masks = recipe.draw_masks(4)
    kwargs = {"masks": masks["spatial"]}
    if "spectral" in masks:
        kwargs["spectral_masks"] = masks["spectral"]
    for x, kw in ((torch.randn(4, 32, 64, 64), kwargs), (torch.randn(4, 32, 32, 32), {})):
        explained = torch._dynamo.explain(backbone.forward_features)(x, **kw)  # global, local
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained
    explained = torch._dynamo.explain(head)(torch.randn(7, backbone.embed_dim))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained


def test_mae_model_compiles_without_graph_breaks() -> None:
    recipe = tiny_recipe(MAERecipe)
    explained = torch._dynamo.explain(recipe.model)(torch.randn(4, 32, 64, 64), 0.75)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained


def test_logs_stay_on_the_device_unless_they_are_on_the_cpu() -> None:
    """Reading GPU logs every step would sync the host with the GPU: only CPU ones become floats
    (the meta device stands in for a GPU here)."""
    cpu = host_free_logs({"a": torch.tensor(1.5), "b": torch.tensor(2, dtype=torch.int64)})
    assert cpu == {"a": 1.5, "b": 2.0} and all(type(v) is float for v in cpu.values())
    device = host_free_logs({"a": torch.tensor(1.5, device="meta", requires_grad=True)})
    assert device["a"].device.type == "meta" and not device["a"].requires_grad


def test_compile_modules_keeps_state_dict_and_blocks_scope_counts() -> None:
    recipe = tiny_recipe(SSViTRecipe)
    keys = list(recipe.state_dict())
    recipe.compile_modules("networks", backend="eager")
    assert list(recipe.state_dict()) == keys
    fresh = tiny_recipe(SSViTRecipe)
    # 2 networks x 4 two-stream blocks (their inner timm Blocks not again) + 2 heads.
    assert compile_blocks(fresh, backend="eager") == 10
    assert list(fresh.state_dict()) == keys
    with pytest.raises(ValueError, match="compile scope must be one of"):
        fresh.compile_modules("everything")


@pytest.mark.parametrize(
    "scope", [pytest.param("networks", marks=pytest.mark.slow), "blocks"]
)  # networks: ~20 s on a 2-core VM
def test_compiled_dinov2_step_matches_eager(scope: str) -> None:
    """One full training step (aot_eager: dynamo + autograd tracing, no code generation) gives the
    eager loss and gradients, with no graph break anywhere."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    eager = tiny_recipe(DINOv2Recipe)
    compiled = copy.deepcopy(eager)
    compiled.compile_modules(scope, backend="aot_eager")
    x = torch.randn(4, 32, 64, 64)
    torch.manual_seed(1)
    loss_e, logs_e = eager(x, 0, 10)
    torch.manual_seed(1)
    loss_c, logs_c = compiled(x, 0, 10)
    assert loss_c.item() == pytest.approx(loss_e.item(), abs=1e-5)
    assert logs_c == pytest.approx(logs_e, abs=1e-5)
    loss_e.backward()
    loss_c.backward()
    for (name, p_e), p_c in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        if p_e.grad is not None:
            torch.testing.assert_close(p_c.grad, p_e.grad, atol=1e-5, rtol=1e-4, msg=name)
    assert sum(counters["graph_break"].values()) == 0
