"""Heatmap of retrieval scores (layers x query heads), selected KV groups outlined.

Uses matplotlib's object API with the Agg canvas (no pyplot global state, works headless).
For TensorBoard: `writer.add_image(tag, save_heatmap(...), dataformats="HWC")`, or
`writer.add_figure(tag, retrieval_heatmap_figure(...))`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from rtpurbo_train.plan import SparsityPlan


def retrieval_heatmap_figure(q_scores: torch.Tensor, retrieval_plan: Optional[SparsityPlan] = None) -> Figure:
    """q_scores: [L, Hq]. With a plan, each retrieval KV head's G query heads get a red outline and
    dashed lines separate KV groups."""
    scores = torch.as_tensor(q_scores, dtype=torch.float32).cpu()
    if scores.dim() != 2:
        raise ValueError(f"q_scores must be [layers, query heads], got shape {tuple(scores.shape)}")
    num_layers, num_heads = scores.shape
    if retrieval_plan is not None and (retrieval_plan.model.num_layers, retrieval_plan.model.num_q_heads) != (num_layers, num_heads):
        raise ValueError(f"plan is for {retrieval_plan.model.num_layers} layers x {retrieval_plan.model.num_q_heads} "
                         f"query heads, scores are {num_layers} x {num_heads}")

    width = min(3.0 + 0.35 * num_heads, 24.0)
    height = min(2.0 + 0.25 * num_layers, 24.0)
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(scores.numpy(), aspect="auto", cmap="viridis", interpolation="nearest", origin="upper")
    fig.colorbar(image, ax=ax, label="retrieval score (needle-echo mass)")
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    title = "retrieval scores"
    if retrieval_plan is not None:
        group = retrieval_plan.model.group
        for boundary in range(group, num_heads, group):
            ax.axvline(boundary - 0.5, color="white", linewidth=0.5, linestyle="--", alpha=0.6)
        for layer in range(num_layers):
            for kv in retrieval_plan.retrieval_kv_heads(layer):
                ax.add_patch(Rectangle((kv * group - 0.5, layer - 0.5), group, 1.0,
                                       fill=False, edgecolor="red", linewidth=1.5))
        title += (f"\n{retrieval_plan.num_retrieval_kv_heads()} retrieval KV heads outlined "
                  f"(fraction {retrieval_plan.retrieval_fraction:g})")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def figure_to_image(fig: Figure) -> np.ndarray:
    """Render a figure to uint8 [H, W, 3] RGB."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_heatmap(q_scores: torch.Tensor, path_png, retrieval_plan: Optional[SparsityPlan] = None) -> np.ndarray:
    """Write the heatmap PNG to `path_png` and return it as uint8 [H, W, 3] (HWC) for TensorBoard."""
    fig = retrieval_heatmap_figure(q_scores, retrieval_plan)
    path = Path(path_png)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return figure_to_image(fig)
