"""The sparsity plan: which heads are retrieval heads, and the sparse-attention settings.

Saved as `plan.json` by calibration; read by the attention dispatch, the trainer and export.
Retrieval heads are chosen per KV head (only that saves KV cache); a KV head's query heads are all
retrieval heads. Query-head scores are kept so the per-query-head RTP-LLM flags can be exported.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator
from rtpurbo_kernels.indexer_select import check_query_stride


# The selection's query stride (kernels/indexer_select/README.md). A plan file without the field keeps
# the exact selection; recipes choose by length (`query_stride_for`), as measured in
# benchmarks/results/selection_h200.md.
DEFAULT_QUERY_STRIDE = 1
# From this training length on, `sparsity.query_stride: auto` uses LONG_CONTEXT_QUERY_STRIDE: there the
# exact selection costs a third of the sparse attention, the strided one 5%; below it the exact
# selection is cheap in absolute terms and keeps the quality of the short SmolLM2 runs.
LONG_CONTEXT_LENGTH = 32768
LONG_CONTEXT_QUERY_STRIDE = 8


# A retrieval head's selection always holds its own query block and the one before it.
MIN_LOCAL_BLOCKS = 2


def window_blocks(window: int, block_size: int) -> int:
    """Key blocks that hold a query block's sliding window of `window` tokens: blocks qb - n + 1 .. qb, with
    n = 1 + ceil((window - 1) / block_size) (a key n is in the window of query m when m - n < window)."""
    return 1 + -(-(window - 1) // block_size) if window > 0 else 0


def query_stride_for(seq_len: int) -> int:
    """The `auto` query stride for a model trained at `seq_len` tokens."""
    return LONG_CONTEXT_QUERY_STRIDE if seq_len >= LONG_CONTEXT_LENGTH else 1


class HeadLayout(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_layers: int = Field(gt=0)
    num_q_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)

    @model_validator(mode="after")
    def _gqa(self):
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(f"num_q_heads {self.num_q_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        return self

    @property
    def group(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    @classmethod
    def from_config(cls, config) -> "HeadLayout":
        heads = config.num_attention_heads
        return cls(
            num_layers=config.num_hidden_layers,
            num_q_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        )


class LayerPlan(BaseModel):
    model_config = ConfigDict(extra="forbid")
    retrieval_kv_heads: list[int] = Field(default_factory=list)
    q_scores: list[float] = Field(default_factory=list)
    kv_scores: list[float] = Field(default_factory=list)


class SparsityPlan(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = 1
    model: HeadLayout
    block_size: int = Field(64, gt=0)
    sink_tokens: int = Field(4, ge=0)
    window: int = Field(1024, gt=0)
    indexer_dim: int = Field(16, gt=0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(None, gt=0)
    # Selection scores every query_stride-th query of a block (and its last); 1 = every query (exact).
    query_stride: int = Field(DEFAULT_QUERY_STRIDE, ge=1)
    retrieval_fraction: float = Field(0.15, gt=0.0, le=1.0)
    # The sliding window (tokens) retrieval heads keep beside their selected blocks, rounded up to whole
    # key blocks; 0 = none (their own and the previous block only: plans made before the setting existed).
    retrieval_window: int = Field(0, ge=0)
    seqlen_threshold: int = Field(0, ge=0)
    # Per layer, a permutation of KV heads applied to the weights (sequence-parallel balancing);
    # None when heads are in their original order.
    kv_head_permutation: Optional[list[list[int]]] = None
    # KV heads appended with zero weights so sequence parallelism can split the model
    # (parallel/head_padding.py): the last ones of `model`, always streaming; export removes them.
    padded_kv_heads: int = Field(0, ge=0)
    layers: list[LayerPlan]

    @model_validator(mode="after")
    def _consistent(self):
        m = self.model
        check_query_stride(self.query_stride, self.block_size)  # the selection kernel's own rule
        if len(self.layers) != m.num_layers:
            raise ValueError(f"plan has {len(self.layers)} layers, model layout says {m.num_layers}")
        for i, layer in enumerate(self.layers):
            heads = layer.retrieval_kv_heads
            if heads != sorted(set(heads)) or any(h < 0 or h >= m.num_kv_heads for h in heads):
                raise ValueError(f"layer {i}: retrieval_kv_heads {heads} must be sorted, unique, in [0, {m.num_kv_heads})")
            if layer.q_scores and len(layer.q_scores) != m.num_q_heads:
                raise ValueError(f"layer {i}: {len(layer.q_scores)} q_scores for {m.num_q_heads} query heads")
            if layer.kv_scores and len(layer.kv_scores) != m.num_kv_heads:
                raise ValueError(f"layer {i}: {len(layer.kv_scores)} kv_scores for {m.num_kv_heads} KV heads")
            if heads and heads[-1] >= m.num_kv_heads - self.padded_kv_heads:
                raise ValueError(f"layer {i}: retrieval head {heads[-1]} is a padded (zero) head")
        return self

    # ---- head padding (sequence parallelism) -----------------------------------------------------
    def with_padding(self, extra: int) -> "SparsityPlan":
        """This plan for the model with `extra` zero KV heads appended (streaming, scores 0)."""
        return self._with_kv_heads(self.model.num_kv_heads + extra, self.padded_kv_heads + extra)

    def without_padding(self) -> "SparsityPlan":
        """The plan of the model with its padded heads removed (head order must be the original one)."""
        if self.kv_head_permutation is not None:
            raise ValueError("undo the KV-head permutation before removing padded heads")
        return self._with_kv_heads(self.model.num_kv_heads - self.padded_kv_heads, 0)

    def _with_kv_heads(self, num_kv: int, padded: int) -> "SparsityPlan":
        """The last KV heads cut off or zero-score heads appended, up to `num_kv` (retrieval heads unchanged)."""
        num_q = num_kv * self.model.group

        def fit(scores: list[float], n: int) -> list[float]:
            return scores and scores[:n] + [0.0] * (n - len(scores))

        layout = self.model.model_copy(update={"num_kv_heads": num_kv, "num_q_heads": num_q})
        layers = [{**layer.model_dump(), "q_scores": fit(layer.q_scores, num_q), "kv_scores": fit(layer.kv_scores, num_kv)}
                  for layer in self.layers]
        return self.model_validate({**self.model_dump(), "model": layout.model_dump(), "padded_kv_heads": padded,
                                    "layers": layers})

    # ---- queries -------------------------------------------------------------------------------
    def retrieval_kv_heads(self, layer: int) -> list[int]:
        return list(self.layers[layer].retrieval_kv_heads)

    def retrieval_q_heads(self, layer: int) -> list[int]:
        g = self.model.group
        return [h * g + j for h in self.layers[layer].retrieval_kv_heads for j in range(g)]

    def headwise_flags(self) -> list[list[int]]:
        """RTP-LLM `headwise_config`: per layer, 1 per retrieval query head, else 0."""
        flags = []
        for i in range(self.model.num_layers):
            row = [0] * self.model.num_q_heads
            for h in self.retrieval_q_heads(i):
                row[h] = 1
            flags.append(row)
        return flags

    @property
    def sink_blocks(self) -> int:
        """Key blocks holding the sink tokens (at least one: the first block is always selected)."""
        return max(1, -(-self.sink_tokens // self.block_size))

    @property
    def retrieval_local_blocks(self) -> int:
        """Blocks ending at the query block that a retrieval head always attends to (its window)."""
        return max(MIN_LOCAL_BLOCKS, window_blocks(self.retrieval_window, self.block_size))

    def num_retrieval_kv_heads(self) -> int:
        return sum(len(layer.retrieval_kv_heads) for layer in self.layers)

    def kv_cache_fraction(self, seq_len: int) -> float:
        """KV-cache bytes of the sparse model over those of the dense model at `seq_len` tokens."""
        total = self.model.num_layers * (self.model.num_kv_heads - self.padded_kv_heads)  # padding is not kept
        ret = self.num_retrieval_kv_heads()
        streaming_len = min(seq_len, self.sink_tokens + self.window)
        return (ret * seq_len + (total - ret) * streaming_len) / (total * seq_len)

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_scores(cls, layout: HeadLayout, q_scores: list[list[float]], fraction: float, **settings) -> "SparsityPlan":
        """Pick the top `fraction` of KV heads over the whole model.

        A KV head scores the max of its query heads' scores (it is a retrieval head if any of its
        query heads is). At least one KV head is kept.
        """
        g = layout.group
        kv_scores = [[max(row[h * g:(h + 1) * g]) for h in range(layout.num_kv_heads)] for row in q_scores]
        ranked = sorted(
            ((s, i, h) for i, row in enumerate(kv_scores) for h, s in enumerate(row)),
            key=lambda t: (-t[0], t[1], t[2]),
        )
        n_keep = max(1, round(fraction * layout.num_layers * layout.num_kv_heads))
        chosen: dict[int, list[int]] = {}
        for _, i, h in ranked[:n_keep]:
            chosen.setdefault(i, []).append(h)
        layers = [
            LayerPlan(retrieval_kv_heads=sorted(chosen.get(i, [])), q_scores=[float(x) for x in q_scores[i]],
                      kv_scores=[float(x) for x in kv_scores[i]])
            for i in range(layout.num_layers)
        ]
        return cls(model=layout, retrieval_fraction=fraction, layers=layers, **settings)

    @classmethod
    def uniform(cls, layout: HeadLayout, retrieval_kv_heads: list[int], **settings) -> "SparsityPlan":
        """The same retrieval KV heads in every layer (tests, and models without calibration)."""
        layers = [LayerPlan(retrieval_kv_heads=sorted(retrieval_kv_heads)) for _ in range(layout.num_layers)]
        fraction = max(len(retrieval_kv_heads), 1) / layout.num_kv_heads
        return cls(model=layout, layers=layers, retrieval_fraction=min(fraction, 1.0), **settings)

    # ---- io --------------------------------------------------------------------------------------
    def save(self, path) -> None:
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.model_dump(), indent=1))
        tmp.replace(path)

    @classmethod
    def load(cls, path) -> "SparsityPlan":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no sparsity plan at {path} (run the calibrate stage first)")
        return cls.model_validate_json(path.read_text())

    def check_model(self, config) -> None:
        """Raise ValueError when this plan was made for a model with another head layout."""
        actual = HeadLayout.from_config(config)
        if actual != self.model:
            raise ValueError(f"sparsity plan was made for {self.model.model_dump()}, but the model has {actual.model_dump()}")

    def summary(self) -> str:
        m = self.model
        lines = [
            f"sparsity plan: {m.num_layers} layers x {m.num_kv_heads} KV heads (group {m.group}), "
            f"{self.num_retrieval_kv_heads()} retrieval KV heads "
            f"({100.0 * self.num_retrieval_kv_heads() / (m.num_layers * m.num_kv_heads):.1f}%)"
            + (f"; the last {self.padded_kv_heads} KV heads are zero padding for sequence parallelism"
               if self.padded_kv_heads else ""),
            f"  streaming: sink {self.sink_tokens} + window {self.window}; retrieval: sink + window "
            f"{self.retrieval_window} ({self.retrieval_local_blocks} blocks) + indexer dim {self.indexer_dim}, "
            + (f"top-k {self.top_k}" if self.top_k else f"top-p {self.top_p}") + f", block {self.block_size}",
            "  layer  retrieval KV heads  max score",
        ]
        for i, layer in enumerate(self.layers):
            best = max(layer.kv_scores) if layer.kv_scores else float("nan")
            lines.append(f"  {i:5d}  {str(layer.retrieval_kv_heads):18s}  {best:.4f}")
        return "\n".join(lines)
