"""Report figures as PNG bytes (matplotlib ``Figure`` objects, no pyplot: no global state).

Every function takes plain arrays/dicts and returns the encoded PNG, so the HTML page can
embed it as a data URI. Class maps use one fixed 25-colour palette (class 0 black).
"""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from hsissl.data.ohs import CLASS_NAMES

# Fixed colours by WHU-OHS label id (0 = unlabelled, black): greens for vegetation,
# blues for water, reds for built-up, browns/greys for bare ground.
PALETTE_HEX: tuple[str, ...] = (
    "#000000",  # 0 unlabelled
    "#9ad94f",  # 1 Paddy field
    "#e6ab02",  # 2 Dry farm
    "#1b7837",  # 3 Woodland
    "#5aae61",  # 4 Shrubbery
    "#a6dba0",  # 5 Sparse woodland
    "#00441b",  # 6 Other forest land
    "#c2e699",  # 7 High-covered grassland
    "#78c679",  # 8 Medium-covered grassland
    "#f7fcb9",  # 9 Low-covered grassland
    "#2171b5",  # 10 River canal
    "#08306b",  # 11 Lake
    "#6baed6",  # 12 Reservoir pond
    "#fdd0a2",  # 13 Beach land
    "#c6dbef",  # 14 Shoal
    "#e31a1c",  # 15 Urban built-up
    "#fb9a99",  # 16 Rural settlement
    "#b15928",  # 17 Other construction land
    "#ffff33",  # 18 Sand
    "#bf812d",  # 19 Gobi
    "#f0f0f0",  # 20 Saline-alkali soil
    "#66c2a4",  # 21 Marshland
    "#dfc27d",  # 22 Bare land
    "#878787",  # 23 Bare rock
    "#6a51a3",  # 24 Ocean
)
PALETTE = np.array([[int(h[i : i + 2], 16) for i in (1, 3, 5)] for h in PALETTE_HEX], np.uint8)
# matplotlib's tab10, then darker/lighter variants: distinct lines for up to 20 runs
SERIES_COLOURS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    "#0b3c5d", "#b35806", "#1b5e20", "#7f0000", "#4a1486",
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5",
)  # fmt: skip
DPI = 100
ROW_LABEL_SIZE = 9  # pt, row labels of image grids
ROW_LABEL_CHARS = 18  # per line: 18 chars at 9 pt stay within a 2.3-inch row


def to_png(fig: Figure) -> bytes:
    """Encode ``fig`` as PNG bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    return buffer.getvalue()


def colorize(label: np.ndarray) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 in the fixed palette (ids past 24 wrap around)."""
    return PALETTE[np.asarray(label, dtype=np.int64) % len(PALETTE)]


def _series_colour(i: int) -> str:
    return SERIES_COLOURS[i % len(SERIES_COLOURS)]


def _hide_axes(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


# -- curves -----------------------------------------------------------------------------------
def loss_curves(runs: Mapping[str, Sequence[Mapping[str, float]]], title: str) -> bytes:
    """Training loss vs step, one line per run; log y-axis when the loss spans > 20x."""
    fig = Figure(figsize=(6.4, 3.4))
    _plot_metric(fig.add_subplot(), runs, title)
    return to_png(fig)


def loss_panels(
    panels: Mapping[str, Mapping[str, Sequence[Mapping[str, float]]]], title: str
) -> bytes:
    """One :func:`loss_curves` panel per entry of ``panels`` (``{panel title: {line label:
    history}}``), two per row, each with its own y-range."""
    ncols = min(2, max(1, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig = Figure(figsize=(6.0 * ncols, 3.2 * nrows + 0.4), layout="constrained")
    fig.suptitle(title, fontsize=11)
    for i, (name, runs) in enumerate(panels.items()):
        _plot_metric(fig.add_subplot(nrows, ncols, i + 1), runs, name)
    return to_png(fig)


def metric_panels(
    runs: Mapping[str, Sequence[Mapping[str, float]]],
    panels: Mapping[str, tuple[str, float | None]],
    title: str,
) -> bytes:
    """One panel per logged metric (``{metric key: (panel title, reference level or None)}``),
    a line per run, the reference dashed (e.g. 1.0 = a uniform teacher), side by side."""
    fig = Figure(figsize=(6.0 * len(panels), 3.4), layout="constrained")
    fig.suptitle(title, fontsize=11)
    for i, (key, (name, ref)) in enumerate(panels.items()):
        ax = fig.add_subplot(1, len(panels), i + 1)
        _plot_metric(ax, runs, name, key=key)
        if ref is not None:
            ax.axhline(ref, color="black", ls="--", lw=1)
    return to_png(fig)


def _plot_metric(ax, runs: Mapping[str, Sequence[Mapping[str, float]]], title: str,
                 key: str = "loss") -> None:  # fmt: skip
    """``key`` (the loss unless said) of each run's history vs step."""
    values: list[float] = []
    for i, (name, history) in enumerate(runs.items()):
        points = [(h["step"], h[key]) for h in history if key in h and "step" in h]
        if not points:
            continue
        steps, losses = zip(*points, strict=True)
        values += [v for v in losses if math.isfinite(v)]
        ax.plot(
            steps,
            losses,
            color=_series_colour(i),
            lw=1.4,
            label=name,
            marker="o" if len(points) < 20 else None,
            ms=3,
        )
    positive = [v for v in values if v > 0]
    if key == "loss" and positive and max(positive) / min(positive) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)


def per_class_iou_bars(
    runs: Mapping[str, Sequence[float | None]], class_names: Sequence[str], title: str
) -> bytes:
    """Grouped bars: per-class IoU (%) of every run; classes no run scored are left out,
    a class absent for one run (IoU None) gets no bar."""
    keep = [
        c
        for c in range(len(class_names))
        if any(r[c] is not None for r in runs.values() if c < len(r))
    ]
    n_runs = max(1, len(runs))
    width = 0.8 / n_runs
    fig = Figure(figsize=(min(18.0, max(8.0, 2 + 0.16 * len(keep) * n_runs)), 4.0))
    ax = fig.add_subplot()
    x = np.arange(len(keep))
    for i, (name, ious) in enumerate(runs.items()):
        heights = [100 * ious[c] if c < len(ious) and ious[c] is not None else np.nan for c in keep]
        ax.bar(x - 0.4 + width * (i + 0.5), heights, width, label=name, color=_series_colour(i))
    ax.set_xticks(x, [class_names[c] for c in keep], rotation=55, ha="right", fontsize=8)
    ax.set_xlim(-0.6, len(keep) - 0.4)
    ax.set_ylim(0, 100)
    ax.set_ylabel("IoU (%)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, frameon=False, ncols=min(4, n_runs), loc="upper right")
    return to_png(fig)


# -- maps -------------------------------------------------------------------------------------
def scene_panels(
    title: str,
    rgb: np.ndarray,
    label: np.ndarray,
    preds: Mapping[str, np.ndarray],
    max_cols: int = 5,
) -> bytes:
    """RGB composite | ground truth | one prediction per run, for one scene (wrapped rows)."""
    panels = [("RGB composite", rgb), ("ground truth", colorize(label))]
    panels += [(f"pred: {name}", colorize(p)) for name, p in preds.items()]
    ncols = math.ceil(len(panels) / math.ceil(len(panels) / max_cols))  # balanced rows
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(2.7 * ncols, 2.9 * nrows + 0.3), layout="constrained")
    fig.suptitle(title, fontsize=11)
    for i, (name, image) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.imshow(image, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        _hide_axes(ax)
    return to_png(fig)


def class_legend(class_ids: Sequence[int] | None = None) -> bytes:
    """Colour key of the palette (all 25 ids, or only ``class_ids``)."""
    ids = list(range(len(CLASS_NAMES))) if class_ids is None else sorted(set(class_ids))
    ncols = 4
    fig = Figure(figsize=(12, 0.28 * math.ceil(len(ids) / ncols) + 0.2))
    handles = [
        Patch(
            facecolor=PALETTE_HEX[i % len(PALETTE_HEX)],
            edgecolor="#555",
            label=f"{i} {CLASS_NAMES[i] if i < len(CLASS_NAMES) else ''}",
        )
        for i in ids
    ]
    fig.legend(handles=handles, ncols=ncols, loc="center", frameon=False, fontsize=9)
    return to_png(fig)


def attention_grid(
    rgbs: Sequence[np.ndarray], maps: Mapping[str, np.ndarray], captions: Sequence[str]
) -> bytes:
    """PNG of :func:`attention_figure`."""
    return to_png(attention_figure(rgbs, maps, captions))


def attention_figure(
    rgbs: Sequence[np.ndarray], maps: Mapping[str, np.ndarray], captions: Sequence[str]
) -> Figure:
    """Row 0: RGB composites of the tiles; one row per encoder (``maps`` keyed by a short row
    label, wrapped to fit the row's height): its CLS attention (n, h, w), each map scaled to
    its own range and drawn over the tile's extent."""
    n = len(rgbs)
    rows = 1 + len(maps)
    fig = Figure(figsize=(2.3 * n + 1.2, 2.3 * rows))
    grid = fig.add_gridspec(rows, n, hspace=0.12, wspace=0.05)
    for j, rgb in enumerate(rgbs):
        ax = fig.add_subplot(grid[0, j])
        ax.imshow(rgb, interpolation="nearest")
        ax.set_title(captions[j], fontsize=8)
        _hide_axes(ax)
        if j == 0:
            ax.set_ylabel("RGB", fontsize=ROW_LABEL_SIZE)
    for i, (name, stack) in enumerate(maps.items(), start=1):
        for j in range(n):
            ax = fig.add_subplot(grid[i, j])
            size = rgbs[j].shape[0]
            ax.imshow(stack[j], cmap="inferno", interpolation="nearest", extent=(0, size, size, 0))
            _hide_axes(ax)
            if j == 0:
                ax.set_ylabel(wrap_label(name), fontsize=ROW_LABEL_SIZE)
    return fig


def wrap_label(text: str, width: int = ROW_LABEL_CHARS, max_lines: int = 3) -> str:
    """``text`` in lines of at most ``width`` characters (long words broken), at most
    ``max_lines`` of them (the last ends in "…" when text was cut)."""
    lines = textwrap.wrap(text, width, break_long_words=True, break_on_hyphens=True) or [""]
    if len(lines) > max_lines:
        lines = [*lines[: max_lines - 1], lines[max_lines - 1][: width - 1] + "…"]
    return "\n".join(lines)


def mae_reconstruction(
    original: np.ndarray,
    reconstruction: np.ndarray,
    mask: np.ndarray,
    bands: Sequence[int],
    band_nm: Sequence[float],
    title: str,
) -> bytes:
    """Rows original | masked input | reconstruction for each band in ``bands`` (columns).

    original/reconstruction: (C, H, W) normalised values; mask: (H, W) bool, True = masked.
    Each column shares the colour range of its original band.
    """
    fig = Figure(figsize=(2.4 * len(bands) + 0.6, 7.4), layout="constrained")
    fig.suptitle(title, fontsize=11)
    rows = (("original", original), ("masked input", None), ("reconstruction", reconstruction))
    for j, b in enumerate(bands):
        lo, hi = np.percentile(original[b], (1, 99))
        for i, (name, data) in enumerate(rows):
            ax = fig.add_subplot(3, len(bands), i * len(bands) + j + 1)
            image = np.where(mask, np.nan, original[b]) if data is None else data[b]
            cmap = "viridis" if data is not None else _grey_bad("viridis")
            ax.imshow(image, cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
            _hide_axes(ax)
            if i == 0:
                ax.set_title(f"band {b + 1} ({band_nm[b]:g} nm)", fontsize=9)
            if j == 0:
                ax.set_ylabel(name, fontsize=9)
    return to_png(fig)


def _grey_bad(name: str):
    from matplotlib import colormaps

    cmap = colormaps[name].copy()
    cmap.set_bad("#bbbbbb")  # masked patches
    return cmap


def band_errors(
    series: Mapping[str, Sequence[float]],
    band_nm: Sequence[float],
    title: str,
    ylabel: str = "MSE (normalised units)",
) -> bytes:
    """Per-band error vs band centre: bars for one series, lines with markers for several."""
    fig = Figure(figsize=(7.0, 3.2))
    ax = fig.add_subplot()
    if len(series) == 1:
        ((name, values),) = series.items()
        ax.bar(band_nm[: len(values)], values, width=9, color=_series_colour(0), label=name)
    else:
        for i, (name, values) in enumerate(series.items()):
            ax.plot(
                band_nm[: len(values)],
                values,
                marker="o",
                ms=3,
                lw=1.2,
                label=name,
                color=_series_colour(i),
            )
        positive = [v for values in series.values() for v in values if v > 0]
        if positive and max(positive) / min(positive) > 20:
            ax.set_yscale("log")  # e.g. PCA vs MAE errors differ by orders of magnitude
    ax.set_xlabel("band centre (nm)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    return to_png(fig)


def explained_variance(ratio: Sequence[float], title: str) -> bytes:
    """Bars: explained variance ratio per component; line: cumulative."""
    ratio = np.asarray(ratio, dtype=np.float64)
    x = np.arange(1, len(ratio) + 1)
    fig = Figure(figsize=(5.0, 3.2))
    ax = fig.add_subplot()
    ax.bar(x, 100 * ratio, color=_series_colour(0), label="per component")
    ax.plot(x, 100 * np.cumsum(ratio), color=_series_colour(1), marker="o", label="cumulative")
    for xi, c in zip(x, np.cumsum(ratio), strict=True):
        ax.annotate(
            f"{100 * c:.1f}%",
            (xi, 100 * c),
            textcoords="offset points",
            xytext=(0, 5),
            ha="center",
            fontsize=8,
        )
    ax.set_xticks(x)
    ax.set_xlabel("principal component")
    ax.set_ylabel("explained variance (%)")
    ax.set_ylim(0, 109)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, frameon=False, loc="center right")
    return to_png(fig)


# -- data -------------------------------------------------------------------------------------
def class_distribution(
    class_pixels: Mapping[str, Sequence[int]], class_names: Sequence[str]
) -> bytes:
    """Share (%) of each split's labelled pixels per class 1..K, grouped by split."""
    splits = list(class_pixels)
    k = len(class_names) - 1
    width = 0.8 / max(1, len(splits))
    fig = Figure(figsize=(11.0, 3.8))
    ax = fig.add_subplot()
    x = np.arange(1, k + 1)
    for i, split in enumerate(splits):
        counts = np.asarray(class_pixels[split], dtype=np.float64)[1 : k + 1]
        share = 100 * counts / max(counts.sum(), 1.0)
        ax.bar(x - 0.4 + width * (i + 0.5), share, width, label=split, color=_series_colour(i))
    ax.set_xticks(x, class_names[1 : k + 1], rotation=55, ha="right", fontsize=8)
    ax.set_xlim(0.4, k + 0.6)
    ax.set_ylabel("share of labelled pixels (%)")
    ax.set_title("Class distribution per split (label 0 excluded)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    return to_png(fig)


def band_statistics(
    mean: Sequence[float], std: Sequence[float], band_nm: Sequence[float], scale: float, title: str
) -> bytes:
    """Per-band mean reflectance with a +-1 std band vs band centre."""
    mean = np.asarray(mean, dtype=np.float64) / scale
    std = np.asarray(std, dtype=np.float64) / scale
    nm = np.asarray(band_nm[: len(mean)], dtype=np.float64)
    fig = Figure(figsize=(7.0, 3.2))
    ax = fig.add_subplot()
    ax.fill_between(
        nm, mean - std, mean + std, color=_series_colour(0), alpha=0.2, label="mean ± std"
    )
    ax.plot(nm, mean, color=_series_colour(0), marker="o", ms=3, label="mean")
    ax.set_xlabel("band centre (nm)")
    ax.set_ylabel("reflectance")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False, loc="upper left")
    return to_png(fig)


# -- real scenes (evaluate-real) ----------------------------------------------------------------
ROLE_COLOURS = {"floor": "#7f7f7f", "baseline": "#1f77b4", "control": "#ff7f0e",
                "pretrained": "#2ca02c"}  # fmt: skip


def real_eval_bars(panels: Mapping[str, Sequence[Mapping[str, object]]], title: str) -> bytes:
    """One horizontal bar panel per (scene, protocol): mean mIoU (%) of each model with its
    std over seeds as an error bar, coloured by role (floor, baseline, control, pretrained),
    and a dashed line at the better floor. ``panels``: {panel title: [entry of
    :func:`hsissl.report.real_table.scene_tables`, in row order]}."""
    n = max(1, len(panels))
    ncols = min(2, n)
    nrows = math.ceil(n / ncols)
    rows = max((len(v) for v in panels.values()), default=1)
    fig = Figure(figsize=(6.4 * ncols, (0.8 + 0.24 * rows) * nrows + 0.5), layout="constrained")
    fig.suptitle(title, fontsize=11)
    for i, (name, entries) in enumerate(panels.items()):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        y = np.arange(len(entries))[::-1]
        means = [100 * float(e["miou"]["mean"]) for e in entries]  # type: ignore[index]
        stds = [100 * float(e["miou"]["std"]) for e in entries]  # type: ignore[index]
        colours = [ROLE_COLOURS.get(str(e["role"]), "#bbbbbb") for e in entries]
        ax.barh(y, means, xerr=stds, color=colours, error_kw={"lw": 1, "capsize": 2})
        floors = [m for m, e in zip(means, entries, strict=True) if e["role"] == "floor"]
        if floors:
            ax.axvline(max(floors), color="#444444", ls="--", lw=1)
        ax.set_yticks(y, [str(e["label"]) for e in entries], fontsize=7)
        ax.set_xlim(0, 100)
        ax.set_xlabel("mIoU (%)")
        ax.set_title(name, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    handles = [Patch(color=c, label=r) for r, c in ROLE_COLOURS.items()]
    fig.legend(handles=handles, loc="outside lower center", ncols=4, fontsize=8, frameon=False)
    return to_png(fig)
