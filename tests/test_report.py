"""The report stage over real runs on a tiny generated dataset: ingest, MAE pretraining,
finetuning (MAE and random-init control), the DeepLabV3+ baseline and the PCA proof of concept."""

from __future__ import annotations

import base64
import json
from dataclasses import asdict
from html import unescape
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from mlflow.tracking import MlflowClient

from conftest import small_run_settings
from hsissl.config import load_config
from hsissl.data.shards import ShardDataset
from hsissl.layout import storage_of
from hsissl.pretrain import checkpoint
from hsissl.pretrain.checkpoint import config_from_dict
from hsissl.pretrain.mae import MAERecipe
from hsissl.pretrain.trainer import pretrain
from hsissl.report import collect as report_collect
from hsissl.report import sections as report_sections
from hsissl.report.captions import results_caption
from hsissl.report.collect import cls_attention, example_tiles, mae_reconstruct
from hsissl.report.labels import scene_inference, unique_labels
from hsissl.report.plots import PALETTE, attention_figure, colorize
from hsissl.report.reference import REFERENCE_NAME, majority_reference, references_for
from hsissl.segment.metrics import ConfusionMatrix
from hsissl.stages import baseline, finetune, ingest, pca_poc, report
from hsissl.storage import open_storage
from hsissl.tracking import resolve_uri

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HEADINGS = (
    "1. Segmentation results",
    "2. Training loss curves",
    "3. Per-class IoU",
    "4. Predicted vs ground-truth maps",
    "5. Last-layer CLS attention",
    "6. MAE reconstructions",
    "7. PCA explained variance",
    "8. Dataset and normalisation",
)
STALE = "finetune-mae-linear-stale"  # a copy of a real result claiming other statistics


def overrides(run_dir: Path, **extra: object) -> list[str]:
    base = small_run_settings(run_dir) | {
        "mae.model": "mae_vit_tiny_patch8_64",
        "finetune.eval_stride": 64,  # = tile: the windows are the eval tiles (caption claim)
        "baseline.encoder": "test_resnet",
        "baseline.batch_size": 2,
        "baseline.max_steps": 2,
        "pca.fit_pixels": 2000,
        "pca.decoder_steps": 2,
        "pca.batch_size": 4,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def cfg_for(run_dir: Path, **extra: object):
    return load_config(REPO / "configs" / "tiny.yaml", overrides(run_dir, **extra))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Every stage once on a tiny dataset, a stale copy of one result, then the report."""
    run_dir = tmp_path_factory.mktemp("report") / "run"
    ingest.run(cfg_for(run_dir))
    encoder_uri = pretrain(cfg_for(run_dir), MAERecipe, "pretrain-mae")["encoder_uri"]
    finetune.run(cfg_for(run_dir, **{"finetune.encoder": encoder_uri}))
    finetune.run(cfg_for(run_dir, **{"finetune.encoder": "random:vit_tiny_patch8_64"}))
    baseline.run(cfg_for(run_dir))
    pca_poc.run(cfg_for(run_dir))
    store = storage_of(cfg_for(run_dir))
    stale = json.loads(store.get_bytes("results/finetune-mae-linear/metrics.json"))
    stale |= {"name": STALE, "normalizer": "0123456789abcdef"}  # the dissertation's bug
    store.put_bytes(f"results/{STALE}/metrics.json", json.dumps(stale).encode())
    result = report.run(cfg_for(run_dir))
    page = store.get_bytes("reports/report/report.html").decode()
    metrics = {
        name: json.loads(store.get_bytes(f"results/{name}/metrics.json")) for name in result.runs
    }
    scenes = len(ShardDataset(store.join("datasets/whu-ohs")).split("ts").scenes)
    return {
        "run_dir": run_dir,
        "store": store,
        "encoder_uri": encoder_uri,
        "result": result,
        "page": page,
        "parsed": parse(page),
        "metrics": metrics,
        "scenes": scenes,
    }


class PageParser(HTMLParser):
    """Headings, images, links, script/link tags and table cells of the report page."""

    def __init__(self) -> None:
        super().__init__()
        self.headings: list[str] = []
        self.imgs: list[str] = []
        self.refs: list[tuple[str, str, str]] = []  # (tag, attribute, value)
        self.tags: set[str] = set()
        self.tables: list[dict] = []  # {"cls", "header": [...], "rows": [{"cls", "cells"}]}
        self._h2: list[str] | None = None
        self._cell: dict | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.add(tag)
        for key in ("src", "href"):
            if a.get(key) is not None:
                self.refs.append((tag, key, a[key]))
        if tag == "img":
            self.imgs.append(a.get("src") or "")
        elif tag == "h2":
            self._h2 = []
        elif tag == "table":
            self.tables.append({"cls": a.get("class") or "", "header": [], "rows": []})
        elif tag == "tr" and self.tables:
            self.tables[-1]["rows"].append({"cls": a.get("class") or "", "cells": []})
        elif tag in ("td", "th") and self.tables:
            self._cell = {
                "tag": tag,
                "text": "",
                "value": a.get("data-value"),
                "cls": a.get("class") or "",
                "inner": [],
            }
        elif self._cell is not None and a.get("class"):
            self._cell["inner"].append(a["class"])

    def handle_endtag(self, tag: str) -> None:
        if tag == "h2" and self._h2 is not None:
            self.headings.append("".join(self._h2).strip())
            self._h2 = None
        elif tag in ("td", "th") and self._cell is not None:
            cell, self._cell = self._cell, None
            cell["text"] = cell["text"].strip()
            table = self.tables[-1]
            if cell["tag"] == "th":
                table["header"].append(cell["text"])
            else:
                table["rows"][-1]["cells"].append(cell)
        elif tag == "table" and self.tables:  # drop the header row (no <td>)
            self.tables[-1]["rows"] = [r for r in self.tables[-1]["rows"] if r["cells"]]

    def handle_data(self, data: str) -> None:
        if self._h2 is not None:
            self._h2.append(data)
        if self._cell is not None:
            self._cell["text"] += data


def parse(page: str) -> PageParser:
    parser = PageParser()
    parser.feed(page)
    parser.close()
    return parser


def table_of(parsed: PageParser, cls: str) -> dict:
    found = [t for t in parsed.tables if t["cls"] == cls]
    assert len(found) == 1, f"expected one table of class {cls!r}, found {len(found)}"
    return found[0]


def rows_by_name(table: dict) -> dict[str, dict]:
    return {row["cells"][0]["text"]: row for row in table["rows"]}


# -- the page -----------------------------------------------------------------------------------
def test_every_section_is_built_from_the_runs(runs):
    result, parsed = runs["result"], runs["parsed"]
    assert parsed.headings == list(HEADINGS)
    assert result.sections == {s: "ok" for s in result.sections}, result.sections
    assert len(result.sections) == len(HEADINGS)
    assert "Not run" not in runs["page"] and "Failed:" not in runs["page"]
    assert result.problems == []
    assert set(result.runs) == {
        "finetune-mae-linear",
        "finetune-random-linear",
        STALE,
        "baseline-deeplabv3plus",
        "pca-poc",
    }
    assert result.encoders == ["mae"]


def test_page_is_self_contained_with_valid_embedded_pngs(runs):
    parsed = runs["parsed"]
    # pretraining + segmentation loss curves, per-class bars, scenes + legend, attention,
    # MAE recon + MSE, PCA x2, data x2
    assert len(parsed.imgs) == 11 + runs["scenes"]
    for src in parsed.imgs:
        assert src.startswith("data:image/png;base64,"), src[:80]
        png = base64.b64decode(src.removeprefix("data:image/png;base64,"), validate=True)
        assert png.startswith(PNG_SIGNATURE) and len(png) > 1000
    for tag, attr, value in parsed.refs:
        assert (attr == "src" and value.startswith("data:image/png;base64,")) or (
            attr == "href" and value.startswith("#")
        ), f"<{tag} {attr}={value[:80]!r}> points outside the page"
    assert not parsed.tags & {"script", "link", "iframe", "object", "embed"}
    assert "<style>" in runs["page"]


def test_main_table_shows_each_runs_metrics_from_metrics_json(runs):
    table = table_of(runs["parsed"], "results")
    metrics = runs["metrics"]
    rows = {n: r for n, r in rows_by_name(table).items() if r["cls"] != "reference"}
    segmentation = {n for n, m in metrics.items() if m["kind"] in ("finetune", "baseline")}
    assert set(rows) == segmentation
    for name, row in rows.items():
        cells = dict(zip(table["header"], row["cells"], strict=True))
        for part in ("tile", "scene"):
            for key, label in (("miou", "mIoU"), ("macc", "mAcc"), ("oa", "OA")):
                cell, expected = cells[f"{part.title()} {label} %"], metrics[name][part][key]
                assert float(cell["value"]) == pytest.approx(expected, rel=1e-12), (name, part, key)
                assert cell["text"] == f"{100 * expected:.2f}"
    # baseline first, then per head the random-init control before the pretrained encoder
    order = [row["cells"][0]["text"] for row in table["rows"]]
    assert order[0] == "baseline-deeplabv3plus"
    assert order.index("finetune-random-linear") < order.index("finetune-mae-linear")
    assert rows["baseline-deeplabv3plus"]["cls"] == "baseline"
    assert rows["finetune-random-linear"]["cls"] == "control"
    gain = dict(zip(table["header"], rows["finetune-mae-linear"]["cells"], strict=True))
    expected = (
        metrics["finetune-mae-linear"]["scene"]["miou"]
        - metrics["finetune-random-linear"]["scene"]["miou"]
    )
    assert float(gain["Δ scene mIoU vs random (pp)"]["value"]) == pytest.approx(expected)


def section_of(page: str, sid: str) -> str:
    start = page.index(f'<section id="{sid}">')
    return page[start : page.index("</section>", start)]


def test_results_caption_and_column_say_how_each_row_was_predicted(runs):
    table = table_of(runs["parsed"], "results")
    rows, col = rows_by_name(table), table["header"].index("Scene inference")
    assert rows["baseline-deeplabv3plus"]["cells"][col]["text"] == "whole scene, one pass"
    finetuned = ("finetune-mae-linear", "finetune-random-linear", STALE)
    for name in finetuned:
        text = rows[name]["cells"][col]["text"]
        assert text == "sliding window, stride 64 px, gaussian blend", name
        m = runs["metrics"][name]  # the caption's claim holds for these runs
        assert m["tile"]["matrix"] == m["scene"]["matrix"], name
    caption = unescape(section_of(runs["page"], "results"))
    assert "baseline-deeplabv3plus predicts each scene in one pass" in caption
    assert "(64 px, 3 run(s))" in caption
    assert "Tile and Scene metrics coincide (identical confusion matrices)" in caption
    assert "sliding window)" not in caption  # the old blanket claim
    assert "percentage points (pp)" in caption and "untrained vit_tiny_patch8_64" in caption


def test_results_caption_claims_nothing_the_rows_do_not_support():
    run = {"name": "a", "kind": "finetune", "encoder": {"method": "mae", "factory": "m"}}
    sliding = run | {"config": {"eval_stride": 32}, "tile": {"matrix": [1]}, "scene": {}}
    assert scene_inference(sliding) == "sliding window, stride 32 px, uniform blend"  # older run
    caption = unescape(results_caption([sliding], [], 64))
    assert "coincide" not in caption and "one pass" not in caption and "Δ" not in caption
    control = run | {"name": "c", "encoder": {"method": "random", "factory": "vit_s"}}
    caption = unescape(results_caption([sliding, control], [], 64))
    assert "untrained vit_s" in caption and "MAE (m) use another architecture" in caption
    odd = {"name": "odd", "kind": "finetune", "config": "not a dict", "encoder": None}
    assert "Metrics in %" in results_caption([odd, control], [], 64)  # no raise


def test_reference_row_is_the_train_majority_class_scored_like_the_runs(runs):
    dataset = ShardDataset(runs["store"].join("datasets/whu-ohs"))
    train = np.asarray(dataset.manifest["splits"]["tr"]["class_pixels"])
    majority = 1 + int(np.argmax(train[1:]))
    # brute force: every pixel of every eval tile predicted as the train split's majority class
    split = dataset.split("ts")
    target = torch.from_numpy(split.get(np.arange(len(split)))[1].astype(np.int64))  # (n, T, T)
    cm = ConfusionMatrix()
    cm.update(torch.full_like(target, majority), target)
    expected = cm.compute()
    assert expected["pixels"] == runs["metrics"]["finetune-mae-linear"]["tile"]["pixels"]
    eval_counts = np.asarray(dataset.manifest["splits"]["ts"]["class_pixels"])
    assert expected["oa"] == pytest.approx(eval_counts[majority] / eval_counts[1:].sum())

    table = table_of(runs["parsed"], "results")
    row = rows_by_name(table)[REFERENCE_NAME]
    assert row["cls"] == "reference" and table["rows"][-1] is row
    cells = dict(zip(table["header"], row["cells"], strict=True))
    assert cells["Kind"]["text"] == "reference, not a model"
    assert cells["Encoder"]["text"].startswith(f"predicts {majority} ")
    for part in ("Tile", "Scene"):
        for key, label in (("miou", "mIoU"), ("macc", "mAcc"), ("oa", "OA")):
            cell = cells[f"{part} {label} %"]
            assert float(cell["value"]) == pytest.approx(expected[key]), (part, key)
            assert "best" not in cell["cls"]
    md = runs["store"].get_bytes("reports/report/summary.md").decode()
    line = next(ln for ln in md.splitlines() if REFERENCE_NAME in ln and ln.startswith("|"))
    assert "not a model" in line and f"| {100 * expected['miou']:.2f} |" in line


def test_majority_reference_counts_absent_classes_like_the_confusion_matrix():
    names = ["unlabelled", "a", "b", "c"]
    manifest = {"num_classes": 3, "class_names": names, "tile_size": 64, "stride": 32}
    manifest["splits"] = {
        "tr": {"class_pixels": [5, 1, 9, 2]},
        "ts": {"class_pixels": [7, 6, 2, 0]},
    }
    ref = majority_reference(manifest, "ts")
    assert (ref["class_id"], ref["class_name"]) == (2, "b")
    tile = ref["tile"]
    assert tile["oa"] == pytest.approx(2 / 8) and tile["pixels"] == 8
    assert tile["per_class_iou"] == [0.0, pytest.approx(0.25), None]  # class 3 absent: left out
    assert tile["miou"] == pytest.approx(0.125) and tile["macc"] == pytest.approx(0.5)
    assert ref["scene"] == {}  # overlapping tiles: scene pixels are not the tiles' pixels
    assert majority_reference(manifest | {"stride": 64}, "ts")["scene"] == tile
    problems: list[str] = []
    assert references_for(manifest, [{"config": {"eval_split": "va"}}], problems) == []
    assert len(problems) == 1 and "splits.va.class_pixels" in problems[0]
    defaulted = references_for(manifest, [{"config": "not a dict"}], problems)  # eval split ts
    assert [r["eval_split"] for r in defaulted] == ["ts"] and len(problems) == 1


def test_segmentation_loss_curves_show_every_heads_and_the_baselines_history(runs, monkeypatch):
    panels: dict = {}
    monkeypatch.setattr(
        report_sections.plots, "loss_panels", lambda p, title: panels.update(p) or b""
    )
    cfg = cfg_for(runs["run_dir"])
    report_sections.section_training(report_collect.collect(cfg), cfg)
    metrics = runs["metrics"]
    assert panels["DeepLabV3+ baseline"] == {
        "from scratch": metrics["baseline-deeplabv3plus"]["history"]
    }
    linear = panels["linear head"]
    assert set(panels) == {"DeepLabV3+ baseline", "linear head"} and len(linear) == 3
    assert linear["random init"] == metrics["finetune-random-linear"]["history"]
    mae = [v for k, v in linear.items() if k.startswith("MAE ")]  # two MAE runs: told apart
    assert sorted(map(len, mae)) == sorted(
        len(metrics[n]["history"]) for n in (STALE, "finetune-mae-linear")
    )
    assert all(len(label) <= 30 for label in linear)
    section = section_of(runs["page"], "training")
    assert section.count("<img") == 2  # the MAE pretraining curve and the segmentation panels
    assert section.index("Segmentation heads and baseline") < section.rindex("<img")


def test_attention_rows_have_short_labels_that_fit_their_row(runs):
    names = {
        "mae-local-20261126-053056-5db01b": "mae",
        "dinov2-local-20261126-053056-5db01b": "dinov2",
    }
    assert list(unique_labels(names | {"ssvit-x": "ssvit"}).values()) == ["MAE", "DINOv2", "SS-ViT"]
    two = unique_labels({"mae-local-20261126-053056-5db01b": "mae", "mae-local-1-aaa": "mae"})
    assert sorted(two.values()) == ["MAE mae-local-1-aaa", "MAE mae-local-202…5db01b"]
    assert "MAE = checkpoints/mae" in unescape(section_of(runs["page"], "attention"))

    rgbs = [np.zeros((64, 64, 3), np.uint8)] * 2
    long = "mae-local-20261126-053056-5db01b (mae)"  # what the rows were labelled before
    maps = {label: np.random.default_rng(0).random((2, 8, 8)) for label in (long, "MAE")}
    fig = attention_figure(rgbs, maps, ["tile 0", "tile 1"])
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    labelled = [ax for ax in fig.axes if ax.get_ylabel()]
    assert len(labelled) == 3  # RGB + one per encoder
    for ax in labelled:
        text = ax.yaxis.label.get_window_extent(canvas.get_renderer())
        box = ax.get_window_extent(canvas.get_renderer())
        assert text.height <= box.height, (ax.get_ylabel(), text.height, box.height)


def test_stage_runs_are_named_after_their_result_with_the_encoder_as_a_param(runs):
    client = MlflowClient(tracking_uri=resolve_uri("", runs["run_dir"]))
    experiment = client.get_experiment_by_name("hsissl")
    found = client.search_runs([experiment.experiment_id], "tags.stage = 'finetune'")
    by_name = {r.info.run_name: r.data.params for r in found}
    assert set(by_name) == {"finetune-mae-linear", "finetune-random-linear"}
    assert by_name["finetune-mae-linear"]["encoder_uri"] == runs["encoder_uri"]
    assert by_name["finetune-random-linear"]["encoder_uri"] == "random:vit_tiny_patch8_64"
    pretrain = client.search_runs([experiment.experiment_id], "tags.stage = 'pretrain-mae'")
    assert [r.info.run_name for r in pretrain] == ["pretrain-mae"]  # checkpoints/mae


def test_per_class_tables_show_absent_classes_as_a_dash(runs):
    metrics, parsed = runs["metrics"], runs["parsed"]
    nones = 0
    for part in ("scene", "tile"):
        table = [t for t in parsed.tables if t["cls"] == "per-class"][("scene", "tile").index(part)]
        names = table["header"][1:]
        assert len(table["rows"]) == 24
        for c, row in enumerate(table["rows"]):
            for name, cell in zip(names, row["cells"][1:], strict=True):
                expected = metrics[name][part]["per_class_iou"][c]
                if expected is None:
                    nones += 1
                    assert cell["text"] == "–" and cell["value"] is None, (name, part, c)
                else:
                    assert float(cell["value"]) == pytest.approx(expected)
                    assert cell["text"] == f"{100 * expected:.1f}"
    assert nones > 0, "the tiny runs left no class absent; the dash was not exercised"


def test_fingerprints_shown_and_a_mismatching_run_flagged_red(runs):
    parsed, result = runs["parsed"], runs["result"]
    dataset_fp = ShardDataset(runs["store"].join("datasets/whu-ohs")).normalizer.fingerprint
    table = table_of(parsed, "fingerprints")
    rows = rows_by_name(
        {"rows": [{"cells": r["cells"][1:], "cls": r["cls"]} for r in table["rows"]]}
    )
    assert rows[runs["store"].join("datasets/whu-ohs")]["cells"][1]["text"].startswith(dataset_fp)
    for name in [*result.runs, "mae"]:
        cell = rows[name]["cells"][1]
        if name == STALE:
            assert "bad" in cell["inner"] and "0123456789abcdef ≠ dataset" in cell["text"]
            assert rows[name]["cls"] == "mismatch"
        else:
            assert cell["text"].startswith(dataset_fp) and "bad" not in cell["inner"], name
    assert result.mismatches == [f"result {STALE}"]
    main = rows_by_name(table_of(parsed, "results"))
    main.pop(REFERENCE_NAME)  # a reference, never bold: tested with the reference
    assert "bad" in main[STALE]["cells"][-1]["inner"] and main[STALE]["cls"] == "mismatch"
    assert "bad" not in main["finetune-mae-linear"]["cells"][-1]["inner"]
    # bold = best of its column among the runs that match the dataset; the stale copy (same
    # numbers as finetune-mae-linear) is never bold
    header = table_of(parsed, "results")["header"]
    for col in (i for i, h in enumerate(header) if h.endswith("%")):
        values = {n: r["cells"][col]["value"] for n, r in main.items()}
        best = max(float(v) for n, v in values.items() if v is not None and n != STALE)
        for name, row in main.items():
            bold = "best" in row["cells"][col]["cls"]
            expected = name != STALE and values[name] is not None and float(values[name]) == best
            assert bold == expected, (name, header[col])


def test_markdown_summary_has_the_table_fingerprints_and_runs(runs):
    md = runs["store"].get_bytes("reports/report/summary.md").decode()
    metrics = runs["metrics"]
    for name, m in metrics.items():
        assert f"`{name}`" in md
        if m["kind"] in ("finetune", "baseline"):
            line = next(ln for ln in md.splitlines() if ln.startswith(f"| `{name}` |"))
            assert f"| {100 * m['scene']['miou']:.2f} |" in line
    dataset_fp = ShardDataset(runs["store"].join("datasets/whu-ohs")).normalizer.fingerprint
    assert f"`{dataset_fp}`" in md
    mismatch_lines = [ln for ln in md.splitlines() if "MISMATCH" in ln]
    assert len(mismatch_lines) == 1 and STALE in mismatch_lines[0]


def test_report_files_are_logged_to_mlflow(runs, tmp_path):
    client = MlflowClient(tracking_uri=resolve_uri("", runs["run_dir"]))
    experiment = client.get_experiment_by_name("hsissl")
    found = client.search_runs([experiment.experiment_id], "tags.stage = 'report'")
    assert len(found) == 1 and found[0].info.status == "FINISHED"
    out = Path(client.download_artifacts(found[0].info.run_id, "", str(tmp_path)))
    assert (out / "report" / "report.html").read_text() == runs["page"]
    assert (out / "report" / "summary.md").is_file()
    assert json.loads((out / "report.json").read_text())["mismatches"] == [f"result {STALE}"]


def test_an_empty_store_gives_not_run_sections_instead_of_failing(runs, tmp_path):
    cfg = cfg_for(runs["run_dir"], **{"storage.uri": tmp_path / "empty", "report.name": "empty"})
    result = report.run(cfg)
    assert result.sections == {s: "not run" for s in result.sections}
    assert any("manifest" in p for p in result.problems)
    page = storage_of(cfg).get_bytes("reports/empty/report.html").decode()
    assert parse(page).headings == list(HEADINGS)
    assert page.count("Not run:") == len(HEADINGS)


def test_named_results_limit_the_report_and_unknown_names_are_listed(runs):
    cfg = cfg_for(
        runs["run_dir"], **{"report.name": "named", "report.results": "[finetune-mae-linear, nope]"}
    )
    inputs = report_collect.collect(cfg)
    assert [r.name for r in inputs.results] == ["finetune-mae-linear"]
    assert len(inputs.problems) == 1 and "nope" in inputs.problems[0]


# -- the pieces the report computes ---------------------------------------------------------------
def test_palette_is_fixed_distinct_with_class_0_black():
    assert PALETTE.shape == (25, 3) and PALETTE[0].tolist() == [0, 0, 0]
    assert len({tuple(c) for c in PALETTE.tolist()}) == 25
    label = np.array([[0, 3], [24, 15]], dtype=np.uint8)
    np.testing.assert_array_equal(colorize(label)[1, 0], PALETTE[24])


def test_config_from_dict_round_trips_and_drops_unknown_keys():
    cfg = load_config(None, ["mae.mask_ratio=0.6", "synthetic.scenes={tr: 2}", "seed=3"])
    tree = asdict(cfg)
    assert config_from_dict(tree) == cfg
    tree["mae"]["retired_option"] = 1
    tree["gone_section"] = {"x": 1}
    assert config_from_dict(tree) == cfg


def test_cls_attention_is_the_cls_rows_share_of_patch_tokens(runs):
    encoder, normalizer, _ = checkpoint.load_model(runs["encoder_uri"])
    tiles = example_tiles(ShardDataset(runs["store"].join("datasets/whu-ohs")), 3)
    x = normalizer(torch.from_numpy(tiles.images))
    maps = cls_attention(encoder, x)
    assert tiles.split == "ts" and maps.shape == (3, 8, 8)
    self_attention = encoder.get_last_attention(x)[:, :, 0, 0].mean(dim=1).detach().numpy()
    assert np.all(maps >= 0)
    np.testing.assert_allclose(maps.sum(axis=(1, 2)) + self_attention, 1.0, atol=1e-5)
    assert not np.allclose(maps[0], maps[0].mean())  # not a constant map


def test_mae_reconstruction_keeps_visible_pixels_and_scores_masked_ones(runs):
    store = runs["store"]
    tiles = example_tiles(ShardDataset(store.join("datasets/whu-ohs")), 4)
    rec = mae_reconstruct(store, "mae", tiles.images, seed=0)
    visible = ~rec.mask[:, None].repeat(rec.original.shape[1], axis=1)  # (n, C, T, T)
    np.testing.assert_array_equal(rec.reconstruction[visible], rec.original[visible])
    assert rec.mask.mean() == pytest.approx(0.75, abs=1 / 64)
    diff = (rec.reconstruction - rec.original) ** 2 * rec.mask[:, None]
    np.testing.assert_allclose(
        rec.per_band_mse, diff.sum(axis=(0, 2, 3)) / rec.mask.sum(), rtol=1e-5
    )
    assert rec.step == 4 and rec.per_band_mse.shape == (32,) and rec.per_band_mse.min() > 0
    again = mae_reconstruct(store, "mae", tiles.images, seed=0)
    np.testing.assert_array_equal(again.reconstruction, rec.reconstruction)  # seeded mask


# -- models rebuilt from checkpoints (pretrain.checkpoint.load_model) ------------------------------
def test_load_model_builds_from_the_records_build_without_a_config_file(runs, monkeypatch):
    def no_saved_config(*args, **kwargs):
        raise AssertionError("a model was rebuilt through its saved config")

    monkeypatch.setattr(checkpoint, "config_from_tree", no_saved_config)
    encoder, normalizer, record = checkpoint.load_model(runs["encoder_uri"])
    mae, mae_normalizer, state = checkpoint.load_model(runs["encoder_uri"], whole=True)
    assert record["build"]["attr"] == "encoder" and state["build"]["attr"] is None
    assert type(mae).__name__ == "MaskedAutoencoderViT" and not mae.training
    assert mae_normalizer == normalizer and state["step"] == record["step"] == 4
    assert not {"recipe", "optimizer", "rng", "state_dict"} & set(state)
    # one run at one point: the whole network's encoder is the record's encoder ...
    for key, value in encoder.state_dict().items():
        assert torch.equal(mae.encoder.state_dict()[key], value), key
    # ... and its decoder holds the trained weights of train.pt, not freshly initialised ones
    trained = checkpoint.load(runs["store"], "checkpoints/mae/train.pt")["recipe"]
    for key in ("decoder_embed.weight", "decoder_pos_embed", "mask_token"):
        assert torch.equal(mae.state_dict()[key], trained[f"model.{key}"]), key


def test_load_model_rebuilds_a_record_without_build_from_its_saved_config(runs, tmp_path):
    """Records written before they held their ``build`` still load, as their recipe built them."""
    record = checkpoint.load(runs["store"], "checkpoints/mae/encoder.pt")
    del record["build"]
    store = open_storage(tmp_path)
    checkpoint.save(store, "old/encoder.pt", record)
    old, _, old_record = checkpoint.load_model(store.join("old/encoder.pt"))
    new, _, _ = checkpoint.load_model(runs["encoder_uri"])
    assert "build" not in old_record and type(old) is type(new)
    assert old.state_dict().keys() == new.state_dict().keys()
    assert all(torch.equal(v, new.state_dict()[k]) for k, v in old.state_dict().items())
    del record["config"]
    checkpoint.save(store, "older/encoder.pt", record)
    with pytest.raises(checkpoint.CheckpointError, match="no build and no config"):
        checkpoint.load_model(store.join("older/encoder.pt"))


def test_learning_evidence_plots_the_teacher_entropy_and_knn_curves_only_where_logged():
    """DINOv2-like histories get a panel per curve and their last values in the caption; a
    history with only a loss (or a single final k-NN value) gets no figure."""
    dino = [{"step": s, "loss": 5.0 - s / 100, "teacher_entropy_rel": 1.0 - s / 400}
            for s in (10, 20, 30)]  # fmt: skip
    dino[-1]["knn_acc"] = 0.5
    dino[0]["knn_acc"] = 0.25
    figure = report_sections.learning_evidence("dinov2", {"dino-a": dino})
    assert figure.count("<img") == 1
    assert "teacher_entropy_rel 0.925" in figure and "knn_acc 0.500" in figure
    dino.append({"step": 31, "knn_acc": 0.75})  # a final k-NN probe after the last log
    figure = report_sections.learning_evidence("dinov2", {"dino-a": dino})
    assert "teacher_entropy_rel 0.925" in figure and "knn_acc 0.750" in figure
    mae = [{"step": 10, "loss": 1.0}, {"step": 20, "loss": 0.5, "knn_acc": 0.4}]
    assert report_sections.learning_evidence("mae", {"mae-a": mae}) == ""
    # SS-ViT's two teachers and evaluate-real's pixel k-NN (from step 0) are curves too
    ssvit = [{"step": 0, "knn_pixel_miou": 0.34}] + [
        {"step": s, "loss": 9.0, "teacher_entropy_rel_spatial": 0.6, "teacher_entropy_rel_spectral": 0.5}
        for s in (10, 20)] + [{"step": 20, "knn_pixel_miou": 0.37}]  # fmt: skip
    figure = report_sections.learning_evidence("ssvit", {"real-ssvit": ssvit})
    assert figure.count("<img") == 1 and "knn_pixel_miou 0.370" in figure
    assert (
        "teacher_entropy_rel_spatial 0.600" in figure
        and "teacher_entropy_rel_spectral 0.500" in figure
    )
