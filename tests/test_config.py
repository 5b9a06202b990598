import re
from pathlib import Path

import pytest
import yaml

from hsissl.config import ConfigError, flatten, load_config, save_resolved, to_dict

REPO = Path(__file__).resolve().parents[1]


def test_preset_then_overrides_win():
    cfg = load_config(
        REPO / "configs" / "tiny.yaml", ["data.tile_size=32", "synthetic.scenes.tr=3"]
    )
    assert cfg.data.tile_size == 32
    assert cfg.synthetic.scenes == {
        "tr": 3,
        "va": 2,
        "ts": 2,
    }  # preset dict kept, one entry overridden
    assert cfg.synthetic.size == 256  # from the preset
    assert cfg.data.stride == 64


# The rates each preset trained at before its lr became a base rate (lr x global batch / 256).
RATES_ON_ONE_DEVICE = {
    "tiny": {"mae": 1e-3, "dinov2": 1e-3, "ssvit": 1e-3},
    "real": {"mae": 1e-3, "dinov2": 1e-3, "ssvit": 1e-3},
    "base": {"mae": 1.5e-4, "dinov2": 5e-4, "ssvit": 5e-4},
    "fast": {"mae": 3e-4, "dinov2": 1e-3, "ssvit": 1e-3},
}


@pytest.mark.parametrize("preset", sorted(RATES_ON_ONE_DEVICE))
def test_presets_state_base_rates_that_give_the_former_rates_on_one_device(preset):
    cfg = load_config(REPO / "configs" / f"{preset}.yaml")
    rates = {
        m: getattr(cfg, m).scaled_lr(cfg.pretrain.batch_size) for m in ("mae", "dinov2", "ssvit")
    }
    assert rates == RATES_ON_ONE_DEVICE[preset]  # exactly: the runs are bit-for-bit the same


def test_lr_is_the_rate_at_a_global_batch_of_256_and_scales_linearly():
    mae = load_config(None, ["mae.lr=2.0e-3"]).mae
    assert mae.scaled_lr(256) == 2e-3
    assert mae.scaled_lr(4 * 64) == 4 * mae.scaled_lr(64)  # 4 processes of 64 each
    assert load_config(None).mae.scaled_lr(128) == 1.5e-4  # the default on one device


def test_base_preset_is_the_paper_setting():
    cfg = load_config(REPO / "configs" / "base.yaml")
    assert (cfg.data.scene_size, cfg.data.tile_size, cfg.data.stride) == (512, 64, 64)


def test_fast_preset_is_the_base_with_a_larger_batch_scaled_lrs_no_dropout_and_compile():
    base = load_config(REPO / "configs" / "base.yaml")
    fast = load_config(REPO / "configs" / "fast.yaml")
    batch = fast.pretrain.batch_size
    assert batch == 4 * base.pretrain.batch_size and fast.pretrain.compile
    assert fast.mae.scaled_lr(batch) == pytest.approx(1.5e-4 * batch / 256)  # MAE's linear rule
    for method in ("dinov2", "ssvit"):
        assert getattr(fast, method).scaled_lr(batch) == pytest.approx(5e-4 * batch / 256)  # DINO
    assert {getattr(fast, m).drop_rate for m in ("mae", "dinov2", "ssvit")} == {0.0}
    assert base.mae.drop_rate == 0.1  # the paper's
    changed = {k for k, v in flatten(to_dict(fast)).items() if flatten(to_dict(base))[k] != v}
    assert changed == {"run_dir", "pretrain.batch_size", "pretrain.compile",
                       "pretrain.cuda_graphs", "pretrain.loader_threads", "mae.lr", "mae.drop_rate", "dinov2.lr",
                       "ssvit.lr"}  # fmt: skip


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.tile_sze=3", "unknown config key 'data.tile_sze'"),
        ("nope=1", "unknown config key 'nope'"),
        ("data.tile_size=abc", "config key 'data.tile_size': expected int, found 'abc'"),
        ("data.drop_unlabelled=3", "config key 'data.drop_unlabelled': expected bool"),
        ("data=3", "config key 'data' is a section"),
        ("tile_size", "expected key.sub=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  tile_size: 64\n  strid: 8\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'data.strid'"):
        load_config(bad)


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.yaml")


def test_optional_and_null(tmp_path):
    cfg = load_config(None, ["data.scene_size=null"])
    assert cfg.data.scene_size is None


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["seed=7"])
    path = save_resolved(cfg, tmp_path / "config.yaml")
    assert load_config(path) == cfg
    assert yaml.safe_load(path.read_text()) == to_dict(cfg)


def test_flatten_gives_dotted_keys():
    flat = flatten(load_config(None, []))
    assert flat["data.tile_size"] == 64
    assert flat["synthetic.scenes.tr"] == 8


def test_cli_help_lists_every_stage_and_each_stage_explains_itself(capsys):
    from hsissl.cli import main, stages

    STAGES = stages()

    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert all(stage in out for stage in STAGES)
    for stage in STAGES:
        with pytest.raises(SystemExit) as info:
            main([stage, "--help"])
        assert info.value.code == 0
        assert "KEY=VALUE" in capsys.readouterr().out


@pytest.mark.parametrize(
    "preset",
    sorted((REPO / "configs").rglob("*.yaml")),
    ids=lambda p: str(p.relative_to(REPO / "configs")),
)
def test_every_preset_loads_validates_and_round_trips(preset, tmp_path):
    cfg = load_config(preset)  # type checks and validate() pass
    assert load_config(save_resolved(cfg, tmp_path / "resolved.yaml")) == cfg


def test_preset_list_is_not_empty():
    # guards the parametrization above against a moved configs/ folder (0 cases pass silently)
    assert len(list((REPO / "configs").rglob("*.yaml"))) >= 12


@pytest.mark.parametrize(
    "text, message",
    [
        ("data:\n  tile_size: [64", r"bad.yaml:2:17: not valid YAML: expected ',' or '\]'"),
        ("data:\n\ttile_size: 64\n", r"bad.yaml:2:1: not valid YAML: .*spaces, not tabs"),
        ("data: {a: b: c}\n", r"bad.yaml:1:\d+: not valid YAML"),
    ],
)
def test_yaml_syntax_error_names_file_line_and_column(tmp_path, text, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(bad)
    assert "<unicode string>" not in str(info.value)


def test_bad_yaml_in_an_override_names_the_override():
    with pytest.raises(
        ConfigError, match=r"override 'data.splits=\[tr': value '\[tr' is not valid"
    ):
        load_config(None, ["data.splits=[tr"])


def test_type_errors_name_where_the_value_came_from(tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text("data: {tile_size: big}\n")
    with pytest.raises(
        ConfigError, match=r"preset.yaml: config key 'data.tile_size': expected int"
    ):
        load_config(preset)
    preset.write_text("synthetic: {scenes: {tr: 1, va: x}}\n")  # a dict field: whole from the file
    with pytest.raises(ConfigError, match=r"preset.yaml: config key 'synthetic.scenes.va'"):
        load_config(preset)
    with pytest.raises(ConfigError, match=r"^command line: config key 'synthetic.scenes.va'"):
        load_config(preset, ["synthetic.scenes.tr=y", "synthetic.scenes.va=2", "synthetic.scenes.tr=3",
                             "synthetic.scenes.va=z"])  # fmt: skip
    preset.write_text("data: {splits: [tr, {a: 1}]}\n")
    with pytest.raises(ConfigError, match=r"preset.yaml: config key 'data.splits\[1\]'"):
        load_config(preset)
    with pytest.raises(ConfigError, match=r"^command line: config key 'data' is a section"):
        load_config(preset, ["data=3"])


def test_override_replacing_a_file_value_takes_the_blame(tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text("synthetic: {scenes: {tr: x}}\n")
    with pytest.raises(ConfigError, match=r"^command line: config key 'synthetic.scenes.tr'"):
        load_config(preset, ["synthetic.scenes={tr: y}"])
    assert load_config(preset, ["synthetic.scenes={tr: 2}"]).synthetic.scenes == {"tr": 2}


def test_a_directory_is_not_a_config_file(tmp_path):
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path} is a directory, not a YAML file")):
        load_config(tmp_path)


@pytest.mark.parametrize(
    "override, message",
    [
        ("pretrain.device=gpu", "pretrain.device='gpu'; expected auto | cpu | cuda | cuda:N"),
        ("pretrain.device=cuda:x", "pretrain.device='cuda:x'"),
        ("dinov2.centering=ema", "dinov2.centering='ema'; expected one of sinkhorn | center"),
        ("ssvit.centering=Sinkhorn", "ssvit.centering='Sinkhorn'"),
        ("pca.decoder=unet", "pca.decoder='unet'; expected one of conv | vit"),
        ("finetune.n_blocks=0", "finetune.n_blocks=0; expected >= 1"),
        ("data.tile_size=0", "data.tile_size=0; expected >= 1"),
        ("data.stride=-8", "data.stride=-8; expected >= 1"),
        ("pretrain.batch_size=0", "pretrain.batch_size=0"),
        ("pretrain.ckpt_every=0", "pretrain.ckpt_every=0"),
        ("pretrain.log_every=0", "pretrain.log_every=0"),
        ("pretrain.max_steps=-1", "pretrain.max_steps=-1; expected >= 0"),
        ("finetune.batch_size=0", "finetune.batch_size=0"),
        ("mae.lr=0", "mae.lr=0.0; expected > 0.0"),
        ("mae.mask_ratio=1.5", "mae.mask_ratio=1.5; expected a value in [0.0, 1.0]"),
        ("dinov2.betas=[0.9]", "dinov2.betas=[0.9]; expected [beta1, beta2]"),
        ("dinov2.mask_ratio=[0.5, 0.1]", "dinov2.mask_ratio=[0.5, 0.1]; expected [low, high]"),
        ("seed=-1", "seed=-1"),
        # the checks the stages made before any work, now made once when a config is loaded
        ("finetune.head=fpn", "finetune.head='fpn'; expected one of linear | conv | segmenter"),
        ("finetune.loss=dice", "finetune.loss='dice'; expected one of ce | focal"),
        ("baseline.name=", "baseline.name=''; expected a non-empty name"),
        ("baseline.batch_size=1", "baseline.batch_size=1; expected >= 2"),
        ("baseline.crop_size=16", "baseline.crop_size=16; expected 0 (whole scenes) or >= 32"),
        ("baseline.epochs=0", "baseline.epochs=0.0; expected > 0 when baseline.max_steps is 0"),
        ("pca.name=", "pca.name=''; expected a non-empty name"),
        ("pca.components=0", "pca.components=0; expected >= 1"),
        ("pca.fit_pixels=1", "pca.fit_pixels=1; expected >= 3 (2 and pca.components)"),
        ("report.name=a/b", "report.name='a/b'; expected a non-empty folder name without '/'"),
        ("real.methods=[simclr]", "real.methods[0]='simclr'; expected one of mae | dinov2 | ssvit"),
        (
            "real.heads=[unet]",
            "real.heads[0]='unet'; expected one of probe | spec-probe | linear | conv",
        ),
        ("real.head_lr={}", "real.head_lr={}; expected a learning rate for head 'linear'"),
    ],
)
def test_values_outside_the_allowed_set_name_key_value_and_allowed(override, message):
    with pytest.raises(ConfigError, match="^command line: config key " + re.escape(message)):
        load_config(None, [override])


def test_rule_choices_are_the_registries_they_name():
    """config_rules stays free of heavy imports, so it names the choices; they must agree."""
    from hsissl import config_rules
    from hsissl.models.heads import HEADS

    assert set(config_rules.HEADS) == set(HEADS)


def test_a_stage_refuses_an_empty_key_it_needs_and_data_errors_read_like_config_errors():
    from hsissl import config_rules

    cfg = load_config(None)  # every stage loads the defaults: finetune.encoder is empty there
    with pytest.raises(ConfigError, match=r"^config key finetune.encoder=''; expected an encoder"):
        config_rules.require(cfg, "finetune")
    config_rules.require(cfg, "pca-poc")  # needs nothing
    with pytest.raises(FileNotFoundError, match=r"^/d: config key real.source='x'; expected y$"):
        raise config_rules.refuse("real.source", "x", "y", "/d", missing=True)
    with pytest.raises(ConfigError, match=r"^dataset /d: config key finetune.eval_split='te'"):
        config_rules.check_splits(["tr", "ts"], "dataset /d", "finetune.eval_split", "te")
    with pytest.raises(ConfigError, match=r"config key data.splits=\['ts'\]; expected a list"):
        config_rules.check_splits(["ts"], "dataset /d", "finetune.eval_split", "ts")


def test_allowed_edge_values_load():
    cfg = load_config(None, ["pretrain.device=cuda:1", "dinov2.centering=center",
                             "ssvit.centering=sinkhorn", "pca.decoder=vit", "finetune.n_blocks=1",
                             "data.tile_size=24", "pretrain.max_steps=0", "pretrain.knn_tiles=0",
                             "data.scene_size=null", "mae.mask_ratio=0"])  # fmt: skip
    assert (cfg.pretrain.device, cfg.data.tile_size, cfg.data.scene_size) == ("cuda:1", 24, None)
    for device in ("auto", "cpu", "cuda"):
        assert load_config(None, [f"pretrain.device={device}"]).pretrain.device == device


def test_out_of_range_value_in_a_file_names_the_file(tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text("pca: {decoder: unet}\n")
    with pytest.raises(ConfigError, match=r"preset.yaml: config key pca.decoder='unet'"):
        load_config(preset)
    assert load_config(preset, ["pca.decoder=conv"]).pca.decoder == "conv"  # the override wins
