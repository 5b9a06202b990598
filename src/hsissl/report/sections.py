"""The report's sections (HTML bodies built from the collected inputs) and the rendered page and
Markdown summary. A section whose inputs are missing says "Not run" and a section that fails
shows its error; neither stops the report (it is the pipeline's exit task)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hsissl.config import Config
from hsissl.data.ohs import BAND_CENTRES_NM, CLASS_NAMES, REFLECTANCE_SCALE
from hsissl.layout import checkpoint_key
from hsissl.report import html, plots, real_section
from hsissl.report.captions import results_caption
from hsissl.report.collect import (
    SEGMENTATION_KINDS,
    ReportInputs,
    ResultRun,
    encoder_attention,
    example_tiles,
    mae_reconstruct,
)
from hsissl.report.labels import method_label, unique_labels
from hsissl.report.real_table import REAL_KIND
from hsissl.segment.scenes import rgb_composite

log = logging.getLogger(__name__)

ATTENTION_TILES = 4  # example tiles in the attention figure
MAE_TILES = 8  # tiles the MAE per-band error is averaged over (the first is shown)
MAE_BANDS = 4  # bands shown per reconstruction, spread over the range


class NotRun(Exception):
    """A section whose inputs do not exist (the reason is shown on the page)."""


@dataclass
class RenderedReport:
    page: str  # report.html
    summary: str  # summary.md
    sections: list[html.Section]
    fingerprints: list[html.FingerprintRow]


def render_report(
    inputs: ReportInputs, cfg: Config, title: str, meta: Sequence[tuple[str, str]]
) -> RenderedReport:
    """The HTML page and the Markdown summary of ``inputs`` under ``title`` and ``meta`` lines."""
    sections = build_sections(inputs, cfg)
    fingerprints = fingerprint_rows(inputs)
    segmentation = [r.metrics for r in inputs.segmentation]
    others = [r.metrics for r in inputs.results if r.kind not in SEGMENTATION_KINDS]
    page = html.page(title, meta, inputs.problems, sections)
    summary = html.markdown_summary(
        title, meta, segmentation, fingerprints, others, inputs.problems, inputs.references
    )
    return RenderedReport(page, summary, sections, fingerprints)


def build_sections(inputs: ReportInputs, cfg: Config) -> list[html.Section]:
    """Every section, in order; missing inputs give "not run", an exception gives "failed"."""
    builders: list[tuple[str, str, Callable[[ReportInputs, Config], str]]] = [
        ("results", "1. Segmentation results", section_results),
        ("training", "2. Training loss curves", section_training),
        ("per-class", "3. Per-class IoU", section_per_class),
        ("maps", "4. Predicted vs ground-truth maps", section_maps),
        ("attention", "5. Last-layer CLS attention", section_attention),
        ("mae", "6. MAE reconstructions", section_mae),
        ("pca", "7. PCA explained variance", section_pca),
        ("data", "8. Dataset and normalisation", section_data),
    ]
    if any(r.kind == REAL_KIND for r in inputs.results):  # only when evaluate-real ran
        builders.append(("real", "9. Real scenes (evaluate-real)", section_real))
    sections = []
    for sid, title, build in builders:
        try:
            sections.append(html.Section(sid, title, build(inputs, cfg)))
        except NotRun as reason:
            sections.append(html.Section(sid, title, html.not_run(str(reason)), "not run"))
        except Exception as exc:  # the exit task must still report everything else
            log.exception("report section %r failed", title)
            body = html.fragment("failed", type(exc).__name__, exc)
            sections.append(html.Section(sid, title, body, "failed"))
    return sections


def section_real(inputs: ReportInputs, cfg: Config) -> str:
    """Per-scene tables of every evaluate-real result, with bar plots."""
    runs = [r for r in inputs.results if r.kind == REAL_KIND]
    return "".join(real_section.render(r.name, r.metrics) for r in runs)


def section_results(inputs: ReportInputs, cfg: Config) -> str:
    runs = [r.metrics for r in inputs.segmentation]
    if not runs:
        raise NotRun("no finetune or baseline results in the store")
    tile = (inputs.manifest or {}).get("tile_size")
    body = [
        results_caption(runs, inputs.references, tile),
        html.results_table(runs, inputs.dataset_fingerprint, inputs.references),
        html.details(
            "Per-class IoU on whole scenes (%)", html.per_class_table(runs, "scene", CLASS_NAMES)
        ),
        html.details(
            "Per-class IoU at tile size (%)", html.per_class_table(runs, "tile", CLASS_NAMES)
        ),
    ]
    elsewhere = [r for r in inputs.segmentation if r.metrics.get("dataset") != inputs.dataset_uri]
    if elsewhere:
        runs = [(r.name, r.metrics.get("dataset")) for r in elsewhere]
        body.append(html.fragment("elsewhere", inputs.dataset_uri, runs))
    others = [r for r in inputs.results if r.kind not in (*SEGMENTATION_KINDS, "pca")]
    if others:
        body.append(html.fragment("other_results", [(r.name, r.kind) for r in others]))
    return "".join(body)


def section_training(inputs: ReportInputs, cfg: Config) -> str:
    """Pretraining loss per method, then the segmentation heads' and the baseline's."""
    encoders = [e for e in inputs.encoders if e.history]
    heads = [r for r in inputs.segmentation if r.metrics.get("history")]
    if not encoders and not heads:
        raise NotRun("no encoder history.json and no finetune/baseline history in the store")
    body = [html.fragment("heading", "Pretraining (encoders)")]
    for method in dict.fromkeys(e.method for e in encoders):
        runs = {e.name: e.history for e in encoders if e.method == method}
        steps = ", ".join(f"{n}: {int(h[-1]['step'])} steps" for n, h in runs.items())
        body.append(
            html.figure(
                plots.loss_curves(runs, f"{method_label(method)} pretraining loss"),
                f"{method}: training loss per logged step ({steps}).",
            )
        )
        body.append(learning_evidence(method, runs))
    missing = [e.name for e in inputs.encoders if not e.history]
    if missing:
        body.append(html.fragment("missing", "history.json for", missing))
    if not encoders:
        body.append(html.not_run("no encoder checkpoint with a history.json in the store"))
    body.append(html.fragment("heading", "Segmentation heads and baseline"))
    body.append(segmentation_losses(inputs, heads))
    return "".join(body)


# Logged metrics that say whether pretraining learnt something beyond its loss value:
# key -> (panel title, reference level: 1.0 = teacher targets as uniform as log K)
LEARNING_METRICS: dict[str, tuple[str, float | None]] = {
    "teacher_entropy_rel": ("teacher entropy / log K (1 = uniform)", 1.0),
    "teacher_entropy_rel_spatial": ("SS-ViT spatial teacher entropy / log K", 1.0),
    "teacher_entropy_rel_spectral": ("SS-ViT spectral teacher entropy / log K", 1.0),
    "knn_acc": ("k-NN tile accuracy (val)", None),
    "knn_pixel_miou": ("k-NN pixel mIoU (labelled scenes)", None),  # evaluate-real's monitor
}


def learning_evidence(method: str, runs: dict[str, list[dict[str, float]]]) -> str:
    """The teacher's entropy and the k-NN probe over training, where a run logged a curve of
    them (two points or more: a k-NN probe only at the end is no curve)."""
    logged = {k: v for k, v in LEARNING_METRICS.items()
              if any(sum(k in h for h in history) > 1 for history in runs.values())}  # fmt: skip
    if not logged:
        return ""
    # the last value of each metric (the history's last entry may hold only one of them)
    last = {n: {k: v[-1] for k in logged if (v := [e[k] for e in h if k in e])}
            for n, h in runs.items()}  # fmt: skip
    ends = "; ".join(f"{n}: " + ", ".join(f"{k} {v:.3f}" for k, v in m.items())
                     for n, m in last.items() if m)  # fmt: skip
    caption = (f"{method}: did pretraining learn? A teacher whose targets stay near log K "
               f"(dashed) has learnt nothing; a rising k-NN curve (tile accuracy, or pixel mIoU "
               f"in evaluate-real) says the features separate classes. Last logged step: "
               f"{ends or 'none'}.")  # fmt: skip
    return html.figure(plots.metric_panels(runs, logged, f"{method_label(method)} learning"),
                       caption)  # fmt: skip


def segmentation_losses(inputs: ReportInputs, runs: list[ResultRun]) -> str:
    """One panel per finetune head (a line per encoder) and one for the baselines."""
    if not runs:
        return html.not_run("no finetune or baseline result with a training history")
    groups: dict[str, list[ResultRun]] = {}
    for r in runs:
        title = "DeepLabV3+ baseline" if r.kind == "baseline" else f"{r.head} head"
        groups.setdefault(title, []).append(r)
    panels = {}
    for title, group in groups.items():
        labels = unique_labels({r.name: r.method for r in group})
        panels[title] = {labels[r.name]: r.metrics["history"] for r in group}
    steps = sorted({int(r.metrics["history"][-1].get("step", 0)) for r in runs})
    body = html.figure(
        plots.loss_panels(panels, "Segmentation training loss"),
        f"Training loss per logged step of {len(runs)} segmentation run(s) (last step "
        f"{', '.join(map(str, steps))}): one panel per head type, a line per encoder "
        "(random init = the untrained control); the baseline's loss includes its auxiliary "
        "term. A curve that does not fall is a run that did not learn.",
    )
    missing = [r.name for r in inputs.segmentation if not r.metrics.get("history")]
    if missing:
        body += html.fragment("missing", "history in metrics.json of", missing)
    return body


def section_per_class(inputs: ReportInputs, cfg: Config) -> str:
    runs = inputs.segmentation
    if not runs:
        raise NotRun("no finetune or baseline results in the store")
    part = "scene" if any(r.metrics.get("scene") for r in runs) else "tile"
    ious = {r.name: r.metrics.get(part, {}).get("per_class_iou") or [] for r in runs}
    names = CLASS_NAMES[1:]  # per_class_iou holds classes 1..24
    png = plots.per_class_iou_bars(ious, names, f"Per-class IoU ({part}s)")
    return html.figure(
        png,
        f"IoU per class and run {'on whole scenes' if part == 'scene' else 'at tile size'}; "
        "classes no run scored are left out, a missing bar is a class absent for that run (–).",
    )


def section_maps(inputs: ReportInputs, cfg: Config) -> str:
    shown = [r for r in inputs.segmentation if r.predictions is not None]
    if not shown:
        raise NotRun("no predictions.npz in any finetune or baseline result")
    scenes: dict[str, dict[str, Any]] = {}  # scene name -> rgb, label, {run: pred}
    for r in shown:
        p = r.predictions
        for i, name in enumerate(p["scenes"].tolist()):
            if name not in scenes and len(scenes) >= cfg.report.scenes:
                continue
            entry = scenes.setdefault(
                name, {"rgb": p["rgb"][i], "label": p["label"][i], "preds": {}}
            )
            entry["preds"][r.name] = p["pred"][i]
    body = []
    present: set[int] = set()
    for name, e in scenes.items():
        present |= set(np.unique(e["label"]).tolist())
        for pred in e["preds"].values():
            present |= set(np.unique(pred).tolist())
        png = plots.scene_panels(f"scene {name}", e["rgb"], e["label"], e["preds"])
        body.append(
            html.figure(
                png,
                f"Scene {name}: RGB composite, ground truth and the "
                f"prediction of {len(e['preds'])} run(s).",
            )
        )
    body.append(
        html.figure(
            plots.class_legend(sorted(present)),
            "Class colours (0 = unlabelled, black; ignored by the metrics).",
        )
    )
    return "".join(body)


def section_attention(inputs: ReportInputs, cfg: Config) -> str:
    if not inputs.encoders:
        raise NotRun("no encoder checkpoints in the store")
    if inputs.dataset is None:
        raise NotRun(f"no dataset at {inputs.dataset_uri} to take example tiles from")
    tiles = example_tiles(inputs.dataset, ATTENTION_TILES)
    rgbs = [rgb_composite(image) for image in tiles.images]
    maps, notes = {}, []
    labels = unique_labels({e.name: e.method for e in inputs.encoders})
    for e in inputs.encoders:
        try:
            maps[labels[e.name]], normalizer = encoder_attention(e.uri, tiles.images)
        except Exception as exc:
            notes.append(f"{e.name}: {type(exc).__name__}: {exc}")
            continue
        if normalizer.fingerprint != inputs.dataset_fingerprint:
            notes.append(
                f"{e.name}: its Normalizer {normalizer.fingerprint} differs from the "
                f"dataset's {inputs.dataset_fingerprint}"
            )
    body = []
    if maps:
        captions = [f"{tiles.split} tile {i}" for i in tiles.indices.tolist()]
        body.append(
            html.figure(
                plots.attention_grid(rgbs, maps, captions),
                "CLS-token attention of the last block over the patch tokens, "
                "mean over heads (each map on its own scale), inputs normalised "
                "with each encoder's own Normalizer. Rows: "
                + "; ".join(f"{labels[e.name]} = {checkpoint_key(e.name)}" for e in inputs.encoders)
                + ".",
            )
        )
    if notes:
        body.append(html.fragment("bad_notes", notes))
    return "".join(body)


def section_mae(inputs: ReportInputs, cfg: Config) -> str:
    runs = [e for e in inputs.encoders if e.method == "mae" and e.train_state]
    if not runs:
        raise NotRun("no MAE checkpoint with its training state (train.pt) in the store")
    if inputs.dataset is None:
        raise NotRun(f"no dataset at {inputs.dataset_uri} to take example tiles from")
    tiles = example_tiles(inputs.dataset, MAE_TILES)
    body = []
    for e in runs:
        rec = mae_reconstruct(inputs.store, e.name, tiles.images, seed=cfg.seed)
        channels = rec.original.shape[1]
        nm = [float(v) for v in BAND_CENTRES_NM[:channels]]
        bands = sorted(set(np.linspace(0, channels - 1, MAE_BANDS).round().astype(int).tolist()))
        title = (
            f"{e.name} (step {rec.step}, {rec.mask_ratio:.0%} masked): "
            f"{tiles.split} tile {int(tiles.indices[0])}"
        )
        body.append(html.fragment("heading", e.name))
        body.append(
            html.figure(
                plots.mae_reconstruction(
                    rec.original[0], rec.reconstruction[0], rec.mask[0], bands, nm, title
                ),
                "Normalised values; masked patches grey in the input, predicted in the "
                "reconstruction (visible patches pasted back).",
            )
        )
        body.append(
            html.figure(
                plots.band_errors(
                    {e.name: rec.per_band_mse.tolist()},
                    nm,
                    f"{e.name}: reconstruction MSE per band",
                ),
                f"Mean squared error on the masked pixels of {len(tiles.indices)} {tiles.split} "
                f"tiles (mean {rec.per_band_mse.mean():.4f}).",
            )
        )
    return "".join(body)


def section_pca(inputs: ReportInputs, cfg: Config) -> str:
    runs = [r for r in inputs.results if r.kind == "pca"]
    if not runs:
        raise NotRun("no PCA results (kind pca) in the store")
    body = []
    for r in runs:
        m = r.metrics
        ratio = m.get("explained_variance") or []
        body.append(html.fragment("heading", r.name))
        body.append(
            html.figure(
                plots.explained_variance(ratio, f"{r.name}: explained variance"),
                f"{len(ratio)} components explain "
                f"{100 * sum(ratio):.2f}% of the normalised variance.",
            )
        )
        errors = m.get("per_band_mse") or {}
        if errors:
            nm = [float(v) for v in m.get("band_centres_nm") or BAND_CENTRES_NM]
            body.append(
                html.figure(
                    plots.band_errors(errors, nm, f"{r.name}: reconstruction MSE per band"),
                    f"On {m.get('eval_tiles', '?')} {m.get('eval_split', '?')} tiles: "
                    + ", ".join(f"{k} mean {v:.4f}" for k, v in (m.get("mean_mse") or {}).items()),
                )
            )
    return "".join(body)


def section_data(inputs: ReportInputs, cfg: Config) -> str:
    manifest = inputs.manifest
    body = []
    if manifest is None:
        body.append(html.not_run(f"no dataset manifest at {inputs.dataset_uri}"))
    else:
        rows = []
        for split, info in manifest["splits"].items():
            pixels = np.asarray(info.get("class_pixels") or [0], dtype=np.int64)
            total = int(pixels.sum())
            rows.append(
                [
                    split,
                    info.get("tiles", 0),
                    len(info.get("scenes", [])),
                    f"{int(pixels[1:].sum()):,}",
                    html.pct(pixels[0] / total if total else None, 1),
                ]
            )
        body.append(
            html.table(
                ["Split", "Tiles", "Scenes", "Labelled pixels", "Unlabelled %"], rows, cls="splits"
            )
        )
        body.append(html.fragment("dataset_line", manifest))
        counts = {
            s: i["class_pixels"] for s, i in manifest["splits"].items() if i.get("class_pixels")
        }
        if counts:
            body.append(
                html.figure(
                    plots.class_distribution(counts, CLASS_NAMES),
                    "Share of each split's labelled pixels per class.",
                )
            )
        norm = manifest.get("normalizer") or {}
        if norm.get("mean"):
            nm = [float(v) for v in manifest.get("band_centres_nm") or BAND_CENTRES_NM]
            split = (manifest.get("band_stats") or {}).get("split", "tr")
            body.append(
                html.figure(
                    plots.band_statistics(
                        norm["mean"],
                        norm["std"],
                        nm,
                        REFLECTANCE_SCALE,
                        f"Band statistics of the Normalizer ({split} split)",
                    ),
                    "Per-band mean reflectance ± one standard deviation: what every model's "
                    "input is normalised with.",
                )
            )
    rows = fingerprint_rows(inputs)
    if rows:
        body.append(html.fragment("fingerprints_intro"))
        body.append(html.fingerprint_table(rows))
    if manifest is None and not rows:
        raise NotRun(f"no dataset manifest at {inputs.dataset_uri} and no runs")
    return "".join(body)


def fingerprint_rows(inputs: ReportInputs) -> list[html.FingerprintRow]:
    """The dataset's Normalizer fingerprint, then every result's and every encoder's."""
    ref = inputs.dataset_fingerprint

    def row(what: str, name: str, fp: str | None) -> html.FingerprintRow:
        return html.FingerprintRow(what, name, fp, None if ref is None or fp is None else fp == ref)

    rows = [] if ref is None else [html.FingerprintRow("dataset", inputs.dataset_uri, ref, True)]
    shown = {r.name for r in inputs.segmentation}
    results: list[ResultRun] = [
        *inputs.segmentation,
        *(r for r in inputs.results if r.name not in shown),
    ]
    rows += [row("result", r.name, r.metrics.get("normalizer")) for r in results]
    rows += [row("encoder", e.name, e.fingerprint) for e in inputs.encoders]
    return rows
