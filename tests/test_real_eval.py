"""Block splits and the real-data evaluation command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hsissl.config import load_config
from hsissl.segment.blocks import block_split, protocol_split
from hsissl.segment.real_eval import dihedral, floor_scores, miou, summarise, work_units


def test_block_split_keeps_whole_blocks_on_one_side():
    mask = block_split((70, 70), block=8, train_fraction=0.1, seed=3)
    assert mask.shape == (70, 70)
    blocks = [mask[y : y + 8, x : x + 8] for y in range(0, 70, 8) for x in range(0, 70, 8)]
    assert all(b.all() or not b.any() for b in blocks)  # no block is split
    assert sum(b.all() for b in blocks) == round(0.1 * len(blocks))


def test_block_split_is_seeded():
    a, b = block_split((64, 64), 16, 0.5, 0), block_split((64, 64), 16, 0.5, 0)
    assert np.array_equal(a, b) and not np.array_equal(a, block_split((64, 64), 16, 0.5, 1))
    with pytest.raises(ValueError, match="train_fraction"):
        block_split((64, 64), 16, 1.0, 0)


@pytest.mark.parametrize(("shape", "block", "fraction"), [((70, 70), 8, 0.1), ((45, 61), 16, 0.5)])
def test_protocol_split_is_spatially_disjoint(shape, block, fraction):
    rng = np.random.default_rng(0)
    label = rng.integers(0, 4, shape).astype(np.uint8)  # 0 = unlabelled, in neither side
    for seed in range(5):
        train, test = protocol_split(label, block, fraction, seed)
        assert train.any() and test.any() and not (train & test).any()
        assert not ((train | test) & (label == 0)).any()
        assert ((train | test) == (label > 0)).all()  # every labelled pixel is scored or fit
        # no test pixel lies within a block that holds a training pixel (edge blocks included)
        for y in range(0, shape[0], block):
            for x in range(0, shape[1], block):
                cell = (slice(y, y + block), slice(x, x + block))
                assert not (train[cell].any() and test[cell].any()), (seed, y, x)
        # and none touches a training pixel except across a block edge
        for dy, dx in ((0, 1), (1, 0)):
            a, b = train[: shape[0] - dy, : shape[1] - dx], test[dy:, dx:]
            ys, xs = np.nonzero(a & b)
            assert all((y + dy) % block == 0 if dy else (x + dx) % block == 0
                       for y, x in zip(ys, xs, strict=True))  # fmt: skip


def test_floors_are_recomputed_on_a_tiny_scene():
    """The floors of evaluate-real equal logistic regression and a random forest fit here by
    hand on the standardised spectra of the training pixels, scored by mIoU over test pixels."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(1)
    label = np.repeat(np.repeat(rng.integers(1, 4, (6, 6)), 4, 0), 4, 1).astype(np.uint8)
    label[:2] = 0  # some unlabelled pixels
    spectra = rng.normal(size=(3, 5))  # one 5-band spectrum per class
    x = (
        spectra[np.maximum(label, 1) - 1].transpose(2, 0, 1) + 1.5 * rng.normal(size=(5, 24, 24))
    ).astype(np.float32)
    train, test = protocol_split(label, 4, 0.4, seed=2)
    got = floor_scores(x, label, train, test, seed=2)

    pixels = x.reshape(5, -1).T
    mu, sd = pixels[train.ravel()].mean(0), pixels[train.ravel()].std(0)
    z = (pixels - mu) / sd
    y = label.ravel()
    models = {"pixel-lr": LogisticRegression(max_iter=500),
              "pixel-rf": RandomForestClassifier(n_estimators=200, n_jobs=-1, random_state=2)}  # fmt: skip
    for name, model in models.items():
        pred = model.fit(z[train.ravel()], y[train.ravel()]).predict(z)
        p, t = pred[test.ravel()], y[test.ravel()]
        ious = [((p == c) & (t == c)).sum() / ((p == c) | (t == c)).sum()
                for c in np.union1d(p, t)]  # fmt: skip
        assert got[name] == pytest.approx(np.mean(ious), abs=1e-6), name
    assert 0.3 < got["pixel-lr"] < 1.0  # a real, imperfect classification, not a trivial one


def test_dihedral_views_are_the_eight_symmetries():
    x = torch.arange(9.0).reshape(1, 1, 3, 3)
    views = dihedral(x)
    assert views.shape == (8, 1, 3, 3)
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8


@pytest.mark.parametrize("bf16", [False, True])
def test_dense_training_runs_the_model_under_bf16_autocast_only_when_asked(bf16):
    """The baseline's bf16 lever: the forward runs in bf16 under autocast, the loss and the
    returned class map stay exact (a (H, W) map of known classes)."""
    from hsissl.segment.real_eval import train_dense

    seen = []

    class Probe(torch.nn.Conv2d):
        def forward(self, x):
            out = super().forward(x)
            seen.append(out.dtype)
            return out

    torch.manual_seed(0)
    image, label = torch.randn(1, 32, 16, 16), np.random.default_rng(0).integers(1, 3, (16, 16))
    pred = train_dense(Probe(32, 3, 1), image, label, np.ones((16, 16), bool), steps=2, lr=1e-2,
                       seed=0, bf16=bf16)  # fmt: skip
    assert seen[:2] == [torch.bfloat16 if bf16 else torch.float32] * 2  # the training steps
    assert seen[-1] == torch.float32  # prediction in fp32
    assert pred.shape == (16, 16) and set(np.unique(pred)) <= {1, 2}


def test_miou_counts_test_pixels_only():
    label = np.array([[1, 1], [2, 2]])
    pred = np.array([[1, 2], [2, 2]])
    test = np.array([[True, False], [True, True]])  # the wrong pixel is a training pixel
    assert miou(pred, label, test) == 1.0
    assert miou(pred, label, np.ones_like(test)) == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_summary_table_has_mean_and_std_over_seeds():
    rows = [
        {"scene": "s", "protocol": "half", "seed": k, "miou": {"m": v}}
        for k, v in enumerate((0.5, 0.7))
    ]
    summary, table = summarise(rows)
    assert summary["s / half"]["m"]["mean"] == pytest.approx(0.6)
    assert "| m | 60.0 ± 10.0 |" in table


@pytest.mark.realdata
@pytest.mark.slow
def test_evaluate_real_runs_end_to_end(shared_data, tmp_path):
    from hsissl.stages import evaluate_real

    cfg = load_config(None, [f"run_dir={tmp_path}", f"real.source={shared_data}", "real.methods=[mae]",
                             "real.seeds=[0]", "real.pretrain_steps=5", "real.head_steps=5", "real.baseline_steps=5",
                             "real.scenes=[Indian_subset]", "mae.model=mae_vit_tiny_patch8_64",
                             "pretrain.batch_size=8", "tracking.uri="])  # fmt: skip
    result = evaluate_real.run(cfg)
    assert "pixel-lr" in result.table and "mae+linear" in result.table
    assert "mae+probe" in result.table and "random-init+segmenter" in result.table


# -- heads trained on one scene's cached windows -------------------------------------------------
def test_scene_windows_cover_every_dihedral_view():
    from hsissl.data.tiling import tile_positions
    from hsissl.segment.scene_heads import SceneWindows

    x = torch.arange(2 * 64 * 80, dtype=torch.float32).reshape(2, 64, 80)
    windows = SceneWindows(tile=64, stride=16).cut(x)
    per_view = [len(tile_positions(64, 80, 64, 16)), len(tile_positions(80, 64, 64, 16))]
    assert windows.shape == (4 * sum(per_view), 2, 64, 64)
    assert torch.equal(windows[0], x[:, :, :64])  # identity view, first window
    assert torch.equal(windows[per_view[0] - 1], x[:, :, 16:])  # flush with the right edge
    assert torch.equal(windows[per_view[0]], torch.rot90(x, 1, dims=(-2, -1))[:, :64])


def _two_class_scene(seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """(32, 64, 64) spectra: left half one spectral shape, right half another, plus noise."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.linspace(-1, 1, 32), torch.linspace(1, -1, 32)
    image = torch.where(torch.arange(64) < 32, a[:, None, None], b[:, None, None]).expand(
        32, 64, 64
    )
    image = image + 0.3 * torch.randn(32, 64, 64, generator=g)
    label = np.where(np.arange(64) < 32, 1, 2)[None].repeat(64, 0).astype(np.uint8)
    return image.contiguous(), label


def test_scene_head_learns_a_separable_scene_from_few_pixels():
    from hsissl.models import create_model
    from hsissl.segment.scene_heads import SceneWindows, train_scene_head, window_features

    torch.manual_seed(0)
    encoder = create_model("vit_tiny_patch8_64").eval()
    image, label = _two_class_scene()
    train = block_split(label.shape, 8, 0.2, seed=0)
    windows = SceneWindows(tile=64, stride=32)
    feats = window_features(encoder, windows.cut(image), n_blocks=4)
    target = np.where(train, label, 0)
    pred = train_scene_head(encoder, "linear", image, target, feats=feats, windows=windows,
                            steps=60, lr=1e-2, seed=0)  # fmt: skip
    assert pred.shape == label.shape and set(np.unique(pred)) <= {1, 2}
    assert miou(pred, label, ~train) > 0.9
    for head in ("conv", "segmenter"):  # the other heads run on the same cache
        pred = train_scene_head(encoder, head, image, target, feats=feats, windows=windows,
                                steps=3, seed=0)  # fmt: skip
        assert pred.shape == label.shape and 0 not in pred


def test_scene_head_refuses_misaligned_features_and_empty_targets():
    from hsissl.models import create_model
    from hsissl.segment.scene_heads import SceneWindows, train_scene_head

    encoder = create_model("vit_tiny_patch8_64").eval()
    image, label = _two_class_scene()
    feats = [torch.zeros(3, 64, 8, 8)] * 4
    with pytest.raises(ValueError, match="feature maps"):
        train_scene_head(encoder, "linear", image, label, feats=feats, windows=SceneWindows(64, 32))
    with pytest.raises(ValueError, match="no labelled pixel"):
        train_scene_head(encoder, "linear", image, np.zeros_like(label), steps=1)


def test_bad_methods_heads_and_scenes_fail_before_any_work(tmp_path):
    from hsissl.config import ConfigError
    from hsissl.stages import evaluate_real

    # A source that holds one known scene file (empty: nothing may read it): the checks below
    # must not depend on ../shared/data being there.
    (tmp_path / "src" / "Samson").mkdir(parents=True)
    (tmp_path / "src" / "Samson" / "Samson.mat").touch()
    source = f"real.source={tmp_path / 'src'}"
    # methods and heads are config values: refused when the config is loaded
    with pytest.raises(ConfigError, match=r"real.heads\[1\]='unet'; expected one of probe \|"):
        load_config(None, [f"run_dir={tmp_path}", source, "real.heads=[probe, unet]"])
    with pytest.raises(ConfigError, match="expected a learning rate for head 'conv'"):
        load_config(
            None, [f"run_dir={tmp_path}", source, "real.heads=[conv]", "real.head_lr={linear: 0.1}"]
        )
    with pytest.raises(ConfigError, match=r"real.methods\[1\]='simclr'; expected one of mae \|"):
        load_config(None, [f"run_dir={tmp_path}", source, "real.methods=[mae, simclr]"])
    for scene in ("Nope", "abu-beach-4"):  # unknown; known but unlabelled
        cfg = load_config(None, [f"run_dir={tmp_path}", source, f"real.scenes=[{scene}]"])
        match = rf"real.scenes\[0\]='{scene}'; expected one of the labelled scenes"
        with pytest.raises(ConfigError, match=match):
            evaluate_real.run(cfg)
    cfg = load_config(None, [f"run_dir={tmp_path}", source])  # a source without the scene asked for
    with pytest.raises(
        FileNotFoundError, match=r"real.scenes\[0\]='houston_dataset'; expected its file .* below"
    ):
        evaluate_real.run(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # nothing written


# -- a converted (hsissl convert) folder as real.source -----------------------------------------
def _converted(tmp_path):
    """One 72-px scene of a made-up sensor, converted from .npy + sidecar with labels."""
    from hsissl.data.convert import convert_path

    rng = np.random.default_rng(0)
    label = np.repeat(np.repeat(rng.integers(1, 4, (9, 9)), 8, 0), 8, 1).astype(np.uint8)
    cube = rng.uniform(0.05, 0.1, (72, 72, 50)) + 0.1 * label[..., None]  # class-dependent
    np.save(tmp_path / "mine.npy", cube)
    np.save(tmp_path / "mine_gt.npy", label)
    (tmp_path / "mine.yaml").write_text(
        "wavelengths: {units: nm, grid: {start: 450, stop: 950, count: 50}}\n"
        "label: {file: mine_gt.npy, rule: as_is}\n"
    )
    convert_path(tmp_path / "mine.npy", tmp_path / "converted")
    return tmp_path / "converted"


def test_evaluate_real_checks_a_converted_folder(tmp_path):
    from hsissl.config import ConfigError
    from hsissl.stages.evaluate_real import check_config

    root = _converted(tmp_path)
    check_config(load_config(None, ["real.scenes=[mine]"]).real, root)
    with pytest.raises(
        ConfigError, match=r"real.scenes\[0\]='Indian_subset'; expected .* found there \['mine'\]"
    ):
        check_config(load_config(None, ["real.scenes=[Indian_subset]"]).real, root)
    with pytest.raises(FileNotFoundError, match="or a WHU-OHS layout"):
        check_config(load_config(None, ["real.scenes=[mine]"]).real, tmp_path / "empty")


def test_evaluate_real_on_a_converted_scene(tmp_path, capfd):
    """The second of the two commands: evaluate-real reads hsissl convert's output."""
    from hsissl.stages import evaluate_real

    root = _converted(tmp_path)
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", f"real.source={root}", "real.methods=[mae]",
                             "real.seeds=[0]", "real.pretrain_steps=2", "real.head_steps=2", "real.baseline_steps=2",
                             "real.scenes=[mine]", "real.heads=[probe, spec-probe, linear]",
                             "real.protocols={half: [16, 0.5]}",
                             "real.baseline_encoder=resnet10t", "mae.model=mae_vit_tiny_patch8_64",
                             "pretrain.batch_size=4", "pretrain.knn_every=1", "tracking.uri="])  # fmt: skip
    result = evaluate_real.run(cfg)
    assert "mine / half" in result.table and "mae+probe" in result.table
    # pretraining logged the pixel k-NN monitor from the untrained encoder on (the report's curve)
    from hsissl.layout import HISTORY, checkpoint_key, storage_of

    history = json.loads(storage_of(cfg).get_bytes(checkpoint_key("real-mae", HISTORY)))
    knn = {h["step"]: h["knn_pixel_miou"] for h in history if "knn_pixel_miou" in h}
    assert set(knn) == {0, 1, 2} and all(0.0 <= v <= 1.0 for v in knn.values())
    # the progress bar named what ran (scene, protocol, seed, model) and reached its total
    err = capfd.readouterr().err
    assert "mine half seed 0" in err and "mae+linear" in err and "deeplabv3plus" in err
    total = work_units(cfg.real, n_encoders=2)  # mae and its random-init control
    assert f"{total}/{total}" in err
    # the per-scene table, with paired differences, next to metrics.json
    store = storage_of(cfg)
    tables = json.loads(store.get_bytes("results/real-eval/tables.json"))
    entries = {e["model"]: e for e in tables["mine"]["half"]["models"]}
    assert entries["mae+probe"]["vs_control"] is not None
    assert store.get_bytes("results/real-eval/tables.md").decode() == result.tables
    assert "### mine" in result.tables and "MAE + probe" in result.tables
    # what the encoders were pretrained on heads the tables (the issue asks for it)
    assert result.tables.startswith("Pretraining data: ") and "from 1 scene (mine)" in result.tables
    assert (tmp_path / "run" / "real-eval-tables.md").read_text() == result.tables
    # The per-pixel floor separates the three class spectra: the scene and labels arrived intact;
    # the spectrum-in-front probe keeps (nearly) what the floor sees, whatever 2 pretraining
    # steps learnt, where the features alone lose much of it.
    assert "| pixel-lr | 100.0 ± 0.0 |" in result.table
    for encoder in ("mae", "random-init"):
        spec, probe = (entries[f"{encoder}+{h}"]["miou"]["mean"] for h in ("spec-probe", "probe"))
        assert spec > 0.95 and spec > probe + 0.1, (encoder, spec, probe)


def test_per_pixel_heads_alone_skip_the_window_features(tmp_path, monkeypatch):
    """configs/real.yaml has only the per-pixel heads: no window features are computed for
    trained heads, and the progress bar's total still matches the work done."""
    import io

    from tqdm import tqdm

    from hsissl.data.normalize import Normalizer
    from hsissl.models import create_model
    from hsissl.segment import real_eval

    root = _converted(tmp_path)
    rc = load_config(None, ["real.seeds=[0]", "real.head_steps=2", "real.baseline_steps=2", "real.protocols={half: [16, 0.5]}",
                            "real.heads=[probe, spec-probe]", "real.baseline_encoder=resnet10t"]).real  # fmt: skip
    calls = []
    window_features = real_eval.window_features
    monkeypatch.setattr(real_eval, "window_features",
                        lambda *a, **k: calls.append(1) or window_features(*a, **k))  # fmt: skip
    encoder = create_model("mae_vit_tiny_patch8_64").encoder.eval()
    normalizer = Normalizer(mean=(2000.0,) * 32, std=(1000.0,) * 32)  # reflectance x 10000
    total = work_units(rc, n_encoders=1)
    with tqdm(total=total, file=io.StringIO()) as bar:  # a quiet bar that still counts
        rows = real_eval.evaluate_scene(rc, "mine", root, {"mae": encoder}, normalizer, bar)
        assert bar.n == total
    assert calls == []
    assert set(rows[0]["miou"]) == {"pixel-lr", "pixel-rf", "mae+probe", "mae+spec-probe",
                                    "deeplabv3plus"}  # fmt: skip


def test_spec_probe_puts_the_spectrum_in_front_of_the_features():
    from hsissl.segment.real_eval import probe_inputs

    image, feats = torch.randn(32, 6, 5), torch.randn(16, 6, 5)  # (C, H, W), (D, H, W)
    assert np.array_equal(probe_inputs("probe", image, feats), feats.numpy())
    both = probe_inputs("spec-probe", image, feats)  # (C + D, H, W)
    assert both.shape == (48, 6, 5)
    assert np.array_equal(both[:32], image.numpy()) and np.array_equal(both[32:], feats.numpy())


# -- the preset ---------------------------------------------------------------------------------
def test_real_preset_runs_every_labelled_shared_scene_with_one_setting(tmp_path):
    from pathlib import Path

    from hsissl.data import realdata
    from hsissl.stages.evaluate_real import check_config

    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(repo / "configs" / "real.yaml")
    labelled = {n for n, spec in realdata.SCENES.items() if realdata.is_labelled(spec)}
    assert set(cfg.real.scenes) == labelled == {"houston_dataset", "Indian_subset", "Samson"}
    assert len(cfg.real.seeds) == 5  # the protocol: mean over 5 seeds
    # what paid on these scenes (docs/real-data.md): MAE at patch 4 with a spectral stem, the
    # per-pixel heads
    assert cfg.real.methods == ["mae"] and cfg.mae.model == "mae_vit_tiny_patch4_stem_64"
    assert cfg.real.heads == ["probe", "spec-probe"]
    # `hsissl report --config configs/real.yaml` reads the dataset evaluate-real ingested
    from hsissl.stages.evaluate_real import DATASET

    assert cfg.data.name == DATASET
    # the other methods and heads are one override away (README, docs/real-data.md)
    every = load_config(repo / "configs" / "real.yaml", ["real.methods=[mae, dinov2, ssvit]",
                        "real.heads=[probe, spec-probe, linear, conv, segmenter]"])  # fmt: skip
    assert every.dinov2.model == "dinov2_vit_tiny_patch4_64" and set(every.real.head_lr) == {
        "linear", "conv", "segmenter"}  # fmt: skip
    # the dataclass default is the same scene list (a bare `hsissl evaluate-real` runs Samson)
    assert load_config(None).real.scenes == cfg.real.scenes
    for stem in ("houston_dataset", "Indian_subset"):  # a source without Samson
        (tmp_path / f"{stem}.mat").touch()
    with pytest.raises(
        FileNotFoundError, match=r"'Samson'; expected its file Samson/Samson.mat below"
    ):
        check_config(cfg.real, tmp_path)  # checked before any work


@pytest.mark.realdata
def test_real_preset_passes_the_checks_on_the_shared_scenes(shared_data):
    from pathlib import Path

    from hsissl.segment.real_eval import load_eval_scene
    from hsissl.stages.evaluate_real import check_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "real.yaml")
    check_config(cfg.real, shared_data)
    image, label = load_eval_scene(shared_data, "Samson")
    assert image.shape == (32, 95, 95) and set(np.unique(label)) == {1, 2, 3}


def test_random_init_controls_one_per_architecture_seeded():
    from hsissl.stages.evaluate_real import random_init_controls

    mae = {"factory": "mae_vit_tiny_patch8_64", "kwargs": {}, "attr": "encoder"}
    dino = {"factory": "dinov2_vit_tiny_patch8_64", "kwargs": {}, "attr": None}
    controls = random_init_controls({"mae": mae, "dinov2": dino, "mae-again": mae}, seed=3)
    assert list(controls) == ["random-init", "random-init@dinov2"]  # mae-again: same architecture
    assert not any(c.training for c in controls.values())
    again = random_init_controls({"dinov2": dino}, seed=3)[
        "random-init"
    ]  # the same seed, the same weights
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(),
                                                 controls["random-init@dinov2"].state_dict().values(), strict=True))  # fmt: skip
