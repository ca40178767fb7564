"""State shared by the attention layers of one sparse model: the mode, the SSA draw of this step, and
what layers record during a forward (indexer KL, alignment loss, sparsity/recall metrics).

The attention function reads it through `module.rtpurbo_runtime`. Records are keyed by layer, so a
layer recomputed under activation checkpointing overwrites its entry instead of adding a second one.
"""
from __future__ import annotations

import dataclasses
import random
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

MODES = ("full", "sparse", "both")


@dataclass
class LayerSparsity:
    """Per-layer constants: which KV/query heads are retrieval heads and each KV head's window.

    Head numbers are slots of the heads the attention function receives: all heads (in the model's
    possibly permuted order, see plan.kv_head_permutation), or, under sequence parallelism, the
    rank's slice of them (`parallel/head_slices.py`)."""
    layer_idx: int
    retrieval_kv: torch.Tensor  # int64 [Hkv_r]
    retrieval_q: torch.Tensor  # int64 [Hq_r]
    streaming_kv: torch.Tensor  # int64 [Hkv - Hkv_r]
    kv_window: torch.Tensor  # int32 [Hkv]: plan.window on streaming heads, 0 (no window) on retrieval heads
    # Sequence parallelism only: the rows of the layer's indexer weights this rank's heads use (None =
    # all rows), this rank's fraction of the layer's retrieval query heads (weights its indexer-KL
    # mean so the SP group's shares add up), and whether the layer has an indexer at all.
    indexer_q_rows: torch.Tensor | None = None
    indexer_k_rows: torch.Tensor | None = None
    kl_share: float = 1.0
    has_indexer: bool | None = None


@dataclass
class SparseRuntime:
    plan: "object"
    backend: str = "auto"
    layers: dict[int, LayerSparsity] = field(default_factory=dict)
    mode: str = "full"
    indexer_kl: bool = False  # record the indexer KL loss in every retrieval layer
    indexer_kl_selected_only: bool = False  # restrict the KL to the selected blocks (DSA sparse stage)
    indexer_kl_stride: int = 1  # the KL uses every S-th query block (training steps; evaluation uses 1)
    measure: bool = False  # record sparsity and recall metrics
    recall_queries: int = 64
    ssa_seed: int = 0
    chosen: str = "sparse"  # the path that feeds o_proj in mode "both", drawn per step
    records: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)
    # device copies of the per-layer index tensors, so a forward never copies them host -> device
    _on_device: dict = field(default_factory=dict, repr=False)
    # Set by parallel.ulysses.enable_sequence_parallel: the SP group, this rank, the model's rotary
    # embedding (cos/sin for the gathered sequence). None = no sequence parallelism.
    sequence_parallel: "object" = None

    @property
    def head_share(self) -> float:
        """This rank's fraction of each layer's attention heads (1/SP): per-head means recorded by the
        layers (SSA alignment) are weighted by it, so the SP group's records add up to the whole mean."""
        return 1.0 / self.sequence_parallel.size if self.sequence_parallel is not None else 1.0

    def __post_init__(self):
        self.set_mode(self.mode)

    def layer_on(self, layer_idx: int, device) -> LayerSparsity:
        """`layers[layer_idx]` with its tensors on `device` (made once per layer object and device)."""
        layer = self.layers[layer_idx]
        key = (layer_idx, str(device))
        cached = self._on_device.get(key)
        if cached is None or cached[0] is not layer:
            moved = dataclasses.replace(layer, **{f.name: getattr(layer, f.name).to(device)
                                                  for f in dataclasses.fields(layer)
                                                  if isinstance(getattr(layer, f.name), torch.Tensor)})
            cached = self._on_device[key] = (layer, moved)
        return cached[1]

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown attention mode {mode!r}; choose one of {MODES}")
        self.mode = mode

    @contextmanager
    def use_mode(self, mode: str):
        previous = self.mode
        self.set_mode(mode)
        try:
            yield self
        finally:
            self.mode = previous

    @contextmanager
    def measuring(self):
        previous, self.measure = self.measure, True
        try:
            yield self
        finally:
            self.measure = previous

    @contextmanager
    def exact_kl(self):
        """The indexer KL over every query block (evaluation), whatever the training stride."""
        previous, self.indexer_kl_stride = self.indexer_kl_stride, 1
        try:
            yield self
        finally:
            self.indexer_kl_stride = previous

    @contextmanager
    def teacher_pass(self):
        """Dense attention with nothing recorded (the teacher's forward in self-distillation)."""
        saved = (self.mode, self.indexer_kl, self.measure)
        self.mode, self.indexer_kl, self.measure = "full", False, False
        try:
            yield self
        finally:
            self.mode, self.indexer_kl, self.measure = saved

    def begin_step(self, step: int) -> None:
        """Draw the SSA path for this step (deterministic in (seed, step), so every rank and a resumed
        run draw the same) and clear the records of the previous forward."""
        self.chosen = "full" if random.Random(self.ssa_seed * 1_000_003 + step).random() < 0.5 else "sparse"
        self.records.clear()

    def path(self) -> str:
        """What feeds o_proj now: 'full' or 'sparse'."""
        return self.chosen if self.mode == "both" else self.mode

    def record(self, name: str, layer_idx: int, value: torch.Tensor) -> None:
        self.records.setdefault(name, {})[layer_idx] = value

    def mean_of(self, name: str) -> torch.Tensor | None:
        """Mean over layers of a recorded scalar (a tensor that keeps its graph), or None if none.
        Under sequence parallelism each record is this rank's share, and every rank records every layer
        that has the loss, so the sum over the SP group of `mean_of` is the whole model's mean."""
        values = list(self.records.get(name, {}).values())
        return torch.stack([v.float() for v in values]).mean() if values else None

    def pop_metrics(self) -> dict[str, float]:
        """Flat float metrics of the last forward (`sparsity/layer3`, `recall/mean`, ...); clears them."""
        out: dict[str, float] = {}
        for name in ("sparsity", "sparsity_streaming", "sparsity_retrieval", "recall", "recall_retrieval"):
            per_layer = self.records.pop(name, {})
            if not per_layer:
                continue
            prefix = name.replace("_", "/")
            for layer, value in sorted(per_layer.items()):
                out[f"{prefix}/layer{layer}"] = float(value)
            out[f"{prefix}/mean"] = float(torch.stack([v.float() for v in per_layer.values()]).mean())
        return out
