"""Evaluation figures (matplotlib object API on the Agg canvas: headless, no pyplot state).

Each `*_figure` function takes plain numbers from the results dict (see `harness.evaluate`) and returns
a Figure; `save_figures` writes them as PNG and hands them to the monitor for TensorBoard.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..calibration.heatmap import retrieval_heatmap_figure
from ..plan import SparsityPlan


def _figure(width: float, height: float) -> tuple[Figure, "object"]:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def accuracy_heatmap_figure(grid: list[list[float]], lengths: list[int], depths: list[float], title: str) -> Figure:
    """grid [len(depths)][len(lengths)] of accuracies in [0, 1] (NaN = no prompt in the cell)."""
    values = np.asarray(grid, dtype=float)
    fig, ax = _figure(2.5 + 0.9 * len(lengths), 1.8 + 0.45 * len(depths))
    image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto", origin="upper")
    fig.colorbar(image, ax=ax, label="exact-match accuracy")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for r in range(values.shape[0]):
        for c in range(values.shape[1]):
            text = "-" if np.isnan(values[r, c]) else f"{values[r, c]:.2f}"
            ax.text(c, r, text, ha="center", va="center", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def _finish(fig, ax, xlabel: str, ylabel: str, title: str) -> Figure:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def sparsity_vs_length_figure(lengths: list[int], series: dict[str, list[float]]) -> Figure:
    """series: label -> one value per length (sparsity in [0, 1]; NaN where not measured)."""
    fig, ax = _figure(5.5, 3.5)
    for label, values in series.items():
        ax.plot(lengths, values, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_ylim(0.0, 1.0)
    return _finish(fig, ax, "context length (tokens)", "fraction of causal key blocks skipped",
                   "attention sparsity vs length")


def recall_per_layer_figure(per_length: dict[int, list[float]]) -> Figure:
    """per_length: context length -> recall of each layer (full-attention mass on the kept keys)."""
    fig, ax = _figure(6.0, 3.5)
    for length, values in per_length.items():
        ax.plot(range(len(values)), values, marker="o", label=f"{length} tokens")
    ax.set_ylim(0.0, 1.02)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _finish(fig, ax, "layer", "attention recall", "attention recall per layer")


def perplexity_by_position_figure(buckets: list[dict]) -> Figure:
    """buckets: dicts with start, end, dense_ppl, sparse_ppl (see `harness`)."""
    centers = [(b["start"] + b["end"] - 1) / 2 for b in buckets]
    fig, ax = _figure(5.5, 3.5)
    ax.plot(centers, [b["dense_ppl"] for b in buckets], marker="o", label="dense")
    ax.plot(centers, [b["sparse_ppl"] for b in buckets], marker="s", label="sparse")
    return _finish(fig, ax, "token position", "perplexity", "perplexity by position")


def evaluation_figures(results: dict, plan: Optional[SparsityPlan]) -> dict[str, Figure]:
    """name -> figure for everything `results` holds (a section that is missing gives no figure)."""
    figs: dict[str, Figure] = {}
    lengths, depths = results["config"]["lengths"], results["config"]["depths"]
    needle = results.get("needle")
    if needle:
        for mode in ("dense", "sparse"):
            figs[f"accuracy_{mode}"] = accuracy_heatmap_figure(needle["grid"][mode], lengths, depths,
                                                                f"needle accuracy, {mode} attention")
    by_length = results.get("attention", {}).get("by_length", {})
    if by_length:
        measured = [n for n in lengths if str(n) in by_length]
        series = {}
        for key, label in (("sparsity/mean", "all heads"), ("sparsity/streaming/mean", "streaming heads"),
                           ("sparsity/retrieval/mean", "retrieval heads")):
            values = [by_length[str(n)].get(key, float("nan")) for n in measured]
            if not all(np.isnan(values)):
                series[label] = values
        figs["sparsity_vs_length"] = sparsity_vs_length_figure(measured, series)
        figs["recall_per_layer"] = recall_per_layer_figure(
            {n: _per_layer(by_length[str(n)], "recall") for n in measured})
    ppl = results.get("perplexity")
    if ppl and "buckets" in ppl:
        figs["perplexity_by_position"] = perplexity_by_position_figure(ppl["buckets"])
    if plan is not None and all(layer.q_scores for layer in plan.layers):
        figs["retrieval_scores"] = retrieval_heatmap_figure(np.asarray([layer.q_scores for layer in plan.layers]), plan)
    return figs


def _per_layer(metrics: dict[str, float], prefix: str) -> list[float]:
    """[metrics['prefix/layer0'], metrics['prefix/layer1'], ...] for the layers present."""
    layers = sorted(int(k[len(prefix) + 6:]) for k in metrics if k.startswith(f"{prefix}/layer"))
    return [metrics[f"{prefix}/layer{i}"] for i in layers]


def save_figures(figs: dict[str, Figure], plot_dir: Path, monitor=None, step: int = 0) -> list[Path]:
    """Write each figure to plot_dir/NAME.png (and to TensorBoard as eval/NAME when `monitor`)."""
    plot_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in figs.items():
        path = plot_dir / f"{name}.png"
        fig.savefig(path, format="png")
        paths.append(path)
        if monitor is not None:
            monitor.add_figure(f"eval/{name}", fig, step)
    return paths
