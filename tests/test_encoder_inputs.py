"""What the user gives as an encoder (``hsissl finetune --encoder X``) or as a pretraining model
(``mae.model=X``): used as given, and refused with an exit-2 error that names it when wrong."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import pytest
import torch

from hsissl import cli
from hsissl.config import ConfigError, load_config
from hsissl.data.normalize import Normalizer
from hsissl.layout import storage_of
from hsissl.pretrain import checkpoint
from hsissl.pretrain.checkpoint import CheckpointError
from hsissl.pretrain.dinov2 import DINOv2Recipe
from hsissl.pretrain.mae import MAERecipe
from hsissl.pretrain.ssvit import SSViTRecipe
from hsissl.segment.finetune import random_encoder
from hsissl.stages import ingest
from hsissl.stages.finetune import resolve_encoder
from hsissl.storage import open_storage

REPO = Path(__file__).resolve().parents[1]
NORMALIZER = Normalizer(tuple(range(1, 33)), (2.0,) * 32)


def overrides(run_dir: Path) -> list[str]:
    """The smallest dataset finetune opens: one 64x64 scene per split."""
    return [f"run_dir={run_dir}", "tracking.uri=", "synthetic.scenes={tr: 1, va: 1, ts: 1}",
            "synthetic.size=64", "data.scene_size=64", "data.shard_tiles=16"]  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("encoder-inputs") / "run"
    ingest.run(load_config(None, overrides(path)))
    return path


def finetune_cli(run_dir: Path, encoder: str, capsys) -> tuple[int, str]:
    """(exit code, stderr) of ``hsissl finetune --encoder <encoder>`` on the tiny dataset."""
    capsys.readouterr()
    code = cli.main(["finetune", *overrides(run_dir), "--encoder", encoder])
    return code, capsys.readouterr().err


def save_record(store_root: Path, key: str, model: str, **build_changes: object) -> str:
    """A seeded ``model`` encoder saved as a record whose build is changed by ``build_changes``."""
    encoder, build = random_encoder(model, seed=0)
    record = checkpoint.encoder_record(
        encoder, build | build_changes, NORMALIZER, "random", {"uri": "-", "fingerprint": "-"},
        config={}, step=0,
    )  # fmt: skip
    return checkpoint.save(open_storage(store_root), key, record)


def saved(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


# -- finetune --encoder, through the CLI ------------------------------------------------------
def test_missing_absolute_path_is_named_as_given(run_dir, tmp_path, capsys):
    missing = tmp_path / "nonexistent" / "encoder.pt"
    code, err = finetune_cli(run_dir, str(missing), capsys)
    assert code == 2
    assert f"error: finetune.encoder='{missing}': no such file" in err
    assert "artifacts" not in err  # not joined onto the store


def test_missing_relative_name_names_both_places_looked_at(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = finetune_cli(run_dir, "checkpoints/nope/encoder.pt", capsys)
    store = storage_of(load_config(None, overrides(run_dir)))
    assert code == 2
    assert "finetune.encoder='checkpoints/nope/encoder.pt': no such file" in err
    assert str(tmp_path / "checkpoints/nope/encoder.pt") in err
    assert store.join("checkpoints/nope/encoder.pt") in err


def test_a_file_that_is_not_a_checkpoint_is_named(run_dir, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    code, err = finetune_cli(run_dir, "configs/tiny.yaml", capsys)
    assert code == 2
    uri = (REPO / "configs/tiny.yaml").as_uri()
    assert f"error: {uri}: not a checkpoint written by hsissl (UnpicklingError" in err


def test_unknown_random_factory_lists_the_known_ones(run_dir, capsys):
    code, err = finetune_cli(run_dir, "random:nonexistent_model", capsys)
    assert code == 2
    assert "finetune.encoder='random:nonexistent_model': unknown model factory" in err
    assert "'mae_vit_tiny_patch8_64'" in err and "'ssvit_tiny_patch8_64'" in err


# -- resolve_encoder ------------------------------------------------------------------------
def test_existing_encoders_resolve_to_what_was_given(tmp_path, monkeypatch):
    store = open_storage(tmp_path / "store")
    uri = save_record(tmp_path / "store", "checkpoints/a/encoder.pt", "vit_tiny_patch8_64")
    path = str(tmp_path / "store/checkpoints/a/encoder.pt")
    assert resolve_encoder("checkpoints/a/encoder.pt", store) == uri  # a key in the store
    assert resolve_encoder(path, store) == path  # absolute: as given
    assert resolve_encoder(uri, store) == uri  # file://…: as given
    monkeypatch.chdir(tmp_path / "store")
    assert resolve_encoder("checkpoints/a/encoder.pt", store) == path  # a local file first
    assert resolve_encoder("random:vit_tiny_patch8_64", store) == "random:vit_tiny_patch8_64"
    with pytest.raises(ConfigError, match=r"finetune.encoder='file:///nowhere/e.pt': no such"):
        resolve_encoder("file:///nowhere/e.pt", store)
    with pytest.raises(ConfigError, match=r"finetune.encoder='ftp://h/e.pt': .*unsupported"):
        resolve_encoder("ftp://h/e.pt", store)


# -- checkpoint.load / load_encoder ---------------------------------------------------------
@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "EOFError"),  # empty
        (b"# a yaml file\n", "UnpicklingError"),
        (b"PK\x03\x04 truncated zip", "RuntimeError"),
        (pickle.dumps({"a": 1}), "RuntimeError"),  # a plain pickle, not torch.save's format
        (saved([1, 2]), "holds a list, expected a dict"),
    ],
    ids=["empty", "text", "zip", "pickle", "list"],
)
def test_load_names_files_that_are_not_checkpoints(tmp_path, content, reason):
    store = open_storage(tmp_path)
    store.put_bytes("x/encoder.pt", content)
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(store, "x/encoder.pt")
    assert str(err.value).startswith(f"{store.join('x/encoder.pt')}: not a checkpoint written")
    assert reason in str(err.value)


def test_load_encoder_names_a_build_that_does_not_fit_its_weights(tmp_path):
    bad_kwargs = save_record(tmp_path, "kw.pt", "vit_tiny_patch8_64", kwargs={"bogus": 1})
    with pytest.raises(CheckpointError, match=r"kw.pt: cannot rebuild .*'bogus'") as err:
        checkpoint.load_model(bad_kwargs)
    assert str(err.value).startswith(bad_kwargs)
    unknown = save_record(tmp_path, "unknown.pt", "vit_tiny_patch8_64", factory="gone_model")
    with pytest.raises(CheckpointError, match=r"unknown.pt: cannot rebuild .*unknown model"):
        checkpoint.load_model(unknown)
    # weights of a ViT-Ti under a record that says ViT-B: every tensor has the wrong size
    wrong = save_record(tmp_path, "wrong.pt", "vit_tiny_patch8_64", factory="vit_base_patch8_64")
    with pytest.raises(CheckpointError) as err:
        checkpoint.load_model(wrong)
    message = str(err.value)
    assert message.startswith(f"{wrong}: its weights do not fit")
    assert "'vit_base_patch8_64'" in message and "size mismatch" in message
    # the unchanged record still loads, with its weights
    good = save_record(tmp_path, "good.pt", "vit_tiny_patch8_64")
    encoder, normalizer, _ = checkpoint.load_model(good)
    expected, _ = random_encoder("vit_tiny_patch8_64", seed=0)
    assert torch.equal(encoder.pos_embed, expected.pos_embed) and normalizer == NORMALIZER


# -- <method>.model ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("recipe", "value", "listed"),
    [
        (MAERecipe, "nope", "mae_vit_tiny_patch8_64"),
        (MAERecipe, "dinov2_vit_tiny_patch8_64", "mae_vit_tiny_patch8_64"),  # not an MAE
        (DINOv2Recipe, "nope", "dinov2_vit_tiny_patch8_64"),
        (SSViTRecipe, "nope", "ssvit_tiny_patch8_64"),
    ],
)
def test_unknown_pretraining_model_names_the_key(recipe, value, listed):
    cfg = load_config(None, [f"{recipe.method}.model={value}"])
    with pytest.raises(ConfigError, match=rf"{recipe.method}.model='{value}'") as err:
        recipe(cfg)
    assert f"'{listed}'" in str(err.value)
