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


def test_base_preset_is_the_paper_setting():
    cfg = load_config(REPO / "configs" / "base.yaml")
    assert (cfg.data.scene_size, cfg.data.tile_size, cfg.data.stride) == (512, 64, 64)


def test_fast_preset_is_the_base_with_a_larger_batch_scaled_lrs_no_dropout_and_compile():
    base = load_config(REPO / "configs" / "base.yaml")
    fast = load_config(REPO / "configs" / "fast.yaml")
    batch = fast.pretrain.batch_size
    assert batch == 4 * base.pretrain.batch_size and fast.pretrain.compile
    assert fast.mae.lr == pytest.approx(1.5e-4 * batch / 256)  # MAE's linear rule
    for method in ("dinov2", "ssvit"):
        assert getattr(fast, method).lr == pytest.approx(5e-4 * batch / 256)  # DINO's rule
    assert {getattr(fast, m).drop_rate for m in ("mae", "dinov2", "ssvit")} == {0.0}
    assert base.mae.drop_rate == 0.1  # the paper's
    changed = {k for k, v in flatten(to_dict(fast)).items() if flatten(to_dict(base))[k] != v}
    assert changed == {"run_dir", "pretrain.batch_size", "pretrain.compile",
                       "pretrain.loader_threads", "mae.lr", "mae.drop_rate", "dinov2.lr",
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
    from hsissl.cli import STAGES, main

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
