"""The plots of `refsim sensitivity` and `refsim report`, drawn with matplotlib (the
`report` extra) on its non-interactive backend, returned as PNG bytes."""

from __future__ import annotations

import io
import logging

import numpy as np

from ..dyadic import ExportError

BIT_COLOURS = {"2": "#d62728", "ternary": "#e377c2", "3": "#ff7f0e", "4": "#ff7f0e", "5": "#bcbd22", "6": "#bcbd22",
               "7": "#2ca02c", "8": "#2ca02c", "16": "#1f77b4"}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ExportError("plots need matplotlib: pip install 'refsim[report]'") from None
    # The first import in a fresh environment builds a font cache and logs that on stderr.
    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig, plt, tight: bool = True) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90 if tight else 80, bbox_inches="tight" if tight else None)
    plt.close(fig)
    return buffer.getvalue()


def _short(name: str, width: int = 48) -> str:
    return name if len(name) <= width else "..." + name[-(width - 3):]


def sensitivity_chart(doc: dict, allocation: dict[str, str] | None = None) -> bytes:
    """Sensitivity per layer (log scale), one marker series per candidate bit width; with an
    allocation, each layer's chosen width is circled."""
    plt = _pyplot()
    layers = doc["layers"]
    names = [entry["name"] for entry in layers]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(names) + 2), 4.2))
    x = np.arange(len(names))
    floor = 1e-12
    for bits in doc["bits"]:
        values = [max(float(entry["sensitivity"].get(bits, np.nan)), floor) for entry in layers]
        ax.plot(x, values, "o-", ms=4, lw=1, label=f"{bits} bits", color=BIT_COLOURS.get(bits))
    if allocation:
        chosen = [(i, max(float(layers[i]["sensitivity"].get(allocation[n], np.nan)), floor))
                  for i, n in enumerate(names) if n in allocation]
        if chosen:
            ax.scatter([c[0] for c in chosen], [c[1] for c in chosen], s=110, facecolors="none", edgecolors="black",
                       linewidths=1.5, label="chosen", zorder=5)
    ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels([_short(n) for n in names], rotation=90, fontsize=7)
    method = doc.get("method", "")
    ax.set_ylabel("1 - similarity" if method in ("pwcca", "svcca") else "output noise / signal")
    ax.set_title(f"sensitivity per layer ({method}{', top-%s' % doc['topk'] if doc.get('topk') else ''})")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, ncol=len(doc["bits"]) + 1)
    return _png(fig, plt)


def sqnr_bars(rows: list[dict]) -> bytes:
    """SQNR of every quantization point against float, in graph order."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.12 * len(rows) + 2), 4.0))
    values = [min(r["sqnr_db"], 120.0) for r in rows]
    colours = [BIT_COLOURS.get(str(r["bits"]), "#7f7f7f") for r in rows]
    ax.bar(np.arange(len(rows)), values, color=colours, width=0.8)
    worst = int(np.argmin(values)) if values else None
    if worst is not None:
        ax.annotate(_short(rows[worst]["tensor"], 40), (worst, values[worst]), xytext=(0, 12), textcoords="offset points",
                    ha="center", fontsize=7, arrowprops={"arrowstyle": "->"})
    ax.set_xlabel("quantization point (graph order)")
    ax.set_ylabel("SQNR against float (dB)")
    ax.set_title("per-tensor SQNR of the integer model")
    ax.grid(True, axis="y", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in dict.fromkeys(colours)]
    labels = [f"int{b}" for b in dict.fromkeys(str(r["bits"]) for r in rows)]
    ax.legend(handles, labels, fontsize=8)
    return _png(fig, plt)


def _log_counts(ax) -> None:
    from matplotlib.ticker import LogLocator, NullLocator

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(numticks=4))
    ax.yaxis.set_minor_locator(NullLocator())  # minor log ticks cost more to draw than the data
    ax.tick_params(labelsize=6)


def tensor_histograms(values: np.ndarray, lo: float, hi: float, clipped: float, counts: np.ndarray, qlo: int, qhi: int,
                      saturated: float, float_name: str, integer_name: str) -> bytes:
    """One quantized tensor, two panels. Left: its float values with the clipping bounds
    [lo, hi] (the integer range times the scale), dashed. Right: its integer values over the
    type's range [qlo, qhi] (`counts` binned evenly over it), the end bins (saturation) red
    (the top one only for unsigned types, whose 0 is no clipping)."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(7.2, 2.3))
    fig.subplots_adjust(left=0.07, right=0.99, bottom=0.12, top=0.8, wspace=0.18)
    vmin, vmax = (float(values.min()), float(values.max())) if values.size else (lo, hi)
    view = (min(vmin, lo), max(vmax, hi))
    far = (view[1] - view[0]) > 4 * max(vmax - vmin, 1e-12)  # bounds far beyond the data (softmax in uint16)
    if far:
        view = (vmin, vmax)
    pad = 0.05 * max(view[1] - view[0], 1e-12)
    hist, edges = np.histogram(values, bins=100, range=(view[0] - pad, view[1] + pad))
    left.stairs(np.maximum(hist, 0.5), edges, fill=True, color="#1f77b4", baseline=0.5)
    for bound in (lo, hi):
        if view[0] - pad <= bound <= view[1] + pad:
            left.axvline(bound, color="#d62728", lw=1.2, ls="--")
    note = f"; bounds [{lo:.3g}, {hi:.3g}] off the axis" if far else ""
    left.set_title(f"{_short(float_name, 44)}\nfloat; outside the bounds {100 * clipped:.3g}%{note}", fontsize=7)
    _log_counts(left)
    edges = np.linspace(qlo, qhi + 1, len(counts) + 1)
    right.stairs(np.maximum(counts, 0.5), edges, fill=True, color="#2ca02c", baseline=0.5)
    for index in ((0, len(counts) - 1) if qlo < 0 else (len(counts) - 1,)):  # an unsigned type's 0 is not clipped
        right.stairs([max(counts[index], 0.5)], edges[index:index + 2], fill=True, color="#d62728", baseline=0.5)
    right.set_xlim(qlo - 0.5, qhi + 1.5)
    right.set_title(f"{_short(integer_name, 44)}\ninteger [{qlo}, {qhi}]; saturated {100 * saturated:.3g}%", fontsize=7)
    _log_counts(right)
    return _png(fig, plt, tight=False)
