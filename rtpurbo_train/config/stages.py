"""Typed stage sections of a recipe. A recipe's `stages:` is a list run in order in one launch;
`type` picks the schema."""
from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..synthetic.config import TaskName

# `kl_query_block_stride: auto` keeps the indexer KL on about this many query positions per sequence.
KL_AUTO_QUERY_ROWS = 8192


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CalibrateStage(Strict):
    """Needle-echo retrieval scores per head on synthetic documents -> plan.json (no training)."""
    type: Literal["calibrate"] = "calibrate"
    lengths: list[Annotated[int, Field(gt=64)]] = Field(default_factory=lambda: [2048, 4096])
    docs_per_length: int = Field(2, gt=0)
    needle_tokens: int = Field(32, gt=0)


class LoraSettings(Strict):
    rank: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


class LossWeights(Strict):
    """Weights of the loss terms; 0 switches a term off (and skips its computation)."""
    lm: float = Field(0.0, ge=0)
    distill: float = Field(0.0, ge=0)
    indexer_kl: float = Field(0.0, ge=0)
    ssa_align: float = Field(0.0, ge=0)


class TrainStage(Strict):
    """Fields shared by the training stages."""
    steps: int = Field(gt=0, description="optimizer steps")
    lr: float = Field(gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decays to lr * min_lr_ratio")
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, ge=0)
    micro_batch_size: int = Field(1, gt=0)
    grad_accum: int = Field(1, gt=0)
    seq_len: int = Field(gt=0)
    log_every: int = Field(1, gt=0)
    save_every: int = Field(100, gt=0)
    eval_every: int = Field(0, ge=0, description="0 = only at the end of the stage")
    eval_batches: int = Field(2, gt=0)
    kl_query_block_stride: Union[Annotated[int, Field(ge=1)], Literal["auto"]] = Field(
        "auto", description="the indexer KL (training steps only; evaluation is exact) uses every S-th query "
        f"block, counting back from the last: O(T^2 / S). auto = max(1, seq_len // {KL_AUTO_QUERY_ROWS}), "
        "so 1 up to 8K tokens")

    def kl_stride(self) -> int:
        if self.kl_query_block_stride == "auto":
            return max(1, self.seq_len // KL_AUTO_QUERY_ROWS)
        return int(self.kl_query_block_stride)

    @model_validator(mode="after")
    def _warmup(self):
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be smaller than steps ({self.steps})")
        return self


class IndexerWarmupStage(TrainStage):
    """Backbone frozen, dense attention; only the indexers learn, from the indexer KL."""
    type: Literal["indexer_warmup"] = "indexer_warmup"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    losses: LossWeights = Field(default_factory=lambda: LossWeights(indexer_kl=1.0))

    @model_validator(mode="after")
    def _only_kl(self):
        if self.losses.indexer_kl <= 0 or self.losses.lm or self.losses.distill or self.losses.ssa_align:
            raise ValueError("indexer_warmup trains only the indexer: set losses.indexer_kl > 0 and the others to 0")
        return self


class SparseTrainStage(TrainStage):
    """Sparsity-aware continued training: sparse (or SSA `both`) attention, self-distillation from the
    dense teacher, optional SSA alignment and indexer KL."""
    type: Literal["sparse_train"] = "sparse_train"
    mode: Literal["sparse", "both"] = "sparse"
    losses: LossWeights = Field(default_factory=lambda: LossWeights(distill=1.0, indexer_kl=1.0))
    distill_topk: int = Field(10, gt=0)
    kl_selected_only: bool = Field(False, description="restrict the indexer KL to the selected blocks (DSA)")
    lora: Optional[LoraSettings] = None
    train_indexer: bool = True

    @model_validator(mode="after")
    def _losses(self):
        w = self.losses
        if not (w.lm or w.distill or w.indexer_kl or w.ssa_align):
            raise ValueError("sparse_train needs at least one loss weight > 0")
        if w.ssa_align and self.mode != "both":
            raise ValueError("losses.ssa_align needs mode: both (SSA computes full and sparse attention)")
        if w.indexer_kl and not self.train_indexer:
            raise ValueError("losses.indexer_kl > 0 needs train_indexer: true")
        return self


class ExportStage(Strict):
    """Write DIR/export/: a Hugging Face folder that plain engines and the sparse modeling code load."""
    type: Literal["export"] = "export"
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    max_shard_size: str = "2GB"


class EvaluateStage(Strict):
    """Dense vs sparse evaluation -> DIR/report.md, DIR/metrics.json, plots.

    Text (the report names it): perplexity by position on the held-out documents of `data.sources`
    (document-level hold-out, `data.eval_fraction`; never trained on), or on held-out synthetic documents
    when the recipe has no sources. Needle haystacks (`haystack`): `heldout` = those held-out documents,
    `generated` = the built-in filler sentences, `auto` = heldout when `data.sources` is set."""
    type: Literal["evaluate"] = "evaluate"
    lengths: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [1024, 2048])
    depths: list[Annotated[float, Field(ge=0, le=1)]] = Field(default_factory=lambda: [0.1, 0.5, 0.9])
    samples_per_cell: int = Field(2, gt=0)
    tasks: list[TaskName] = Field(default_factory=lambda: ["passkey", "single_needle", "multikey", "multivalue"],
                                  min_length=1, description="needle tasks; sample k of a cell runs tasks[k % len]")
    haystack: Literal["auto", "heldout", "generated"] = "auto"
    perplexity_docs: int = Field(4, gt=0)
    perplexity_len: int = Field(1024, gt=0)
    timing_runs: int = Field(3, gt=0, description="prefill time: the median of this many forwards per length and mode")


Stage = Annotated[Union[CalibrateStage, IndexerWarmupStage, SparseTrainStage, ExportStage, EvaluateStage],
                  Field(discriminator="type")]
STAGE_TYPES = ("calibrate", "indexer_warmup", "sparse_train", "export", "evaluate")
