"""The recipe: one YAML file, validated into these types before any model is loaded."""
from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import Field, model_validator

from ..data import DataConfig
from ..models import ModelConfig
from ..plan import LONG_CONTEXT_LENGTH, LONG_CONTEXT_QUERY_STRIDE
from .stages import STAGE_TYPES, Stage, Strict

# The exported model's dense fallback, from benchmarks/results/prefill_h200.md (2026-12-02, one H200): the
# sparse prefill first matches the plain load at 32K on the Qwen2-1.5B shape (0.99x; 0.86x at 16K, 1.73x at
# 128K) and never does up to 8K on SmolLM2-135M (0.34-0.55x). RTP-LLM's default is 16384.
DEFAULT_SEQLEN_THRESHOLD = 32768


class SparsitySettings(Strict):
    """Sparsity plan settings (METHOD.md). The window is in tokens; scale it to the context."""
    retrieval_fraction: float = Field(0.15, gt=0, le=1)
    window: int = Field(1024, gt=0)
    sink_tokens: int = Field(4, ge=0)
    block_size: Literal[64] = 64
    indexer_dim: int = Field(16, gt=0)
    top_p: float = Field(0.9, gt=0, le=1)
    top_k: Optional[int] = Field(None, gt=0, description="fixed top-k blocks instead of top-p")
    retrieval_window: Union[Annotated[int, Field(ge=0)], Literal["auto"]] = Field(
        "auto", description="the sliding window (tokens) retrieval heads keep beside the blocks their indexer "
        "selects (top-p / top-k run over the blocks outside it); auto = window; 0 = none")
    query_stride: Union[Annotated[int, Field(ge=1)], Literal["auto"]] = Field(
        "auto", description="block selection scores every S-th query of a block and its last (a power of two "
        f"<= 64; 1 = every query, the exact oracle); auto = {LONG_CONTEXT_QUERY_STRIDE} when the longest training "
        f"stage runs >= {LONG_CONTEXT_LENGTH} tokens, else 1")
    seqlen_threshold: int = Field(DEFAULT_SEQLEN_THRESHOLD, ge=0, description="exported model: prompts shorter "
                                  "than this run dense (written to config.json); 0 = always sparse")
    plan: Optional[str] = Field(None, description="use this plan.json instead of calibrating")
    backend: Literal["auto", "reference", "triton"] = "auto"


class DeepSpeedSettings(Strict):
    config: str = Field("configs/zero2.json", description="a DeepSpeed JSON (relative to the repo or absolute)")
    activation_checkpointing: bool = False


class ParallelSettings(Strict):
    sequence_parallel_size: int = Field(1, gt=0)
    pad_heads: bool = Field(False, description="when SP cannot split the model's heads, append zero-weight KV "
                            "heads (an exact change; export removes them) instead of stopping with an error")


class LoggingSettings(Strict):
    tensorboard: bool = True
    progress: bool = True


class Recipe(Strict):
    name: str = "recipe"
    description: str = ""
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    sparsity: SparsitySettings = Field(default_factory=SparsitySettings)
    deepspeed: DeepSpeedSettings = Field(default_factory=DeepSpeedSettings)
    parallel: ParallelSettings = Field(default_factory=ParallelSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    stages: list[Stage] = Field(min_length=1)

    @model_validator(mode="after")
    def _order(self):
        kinds = [s.type for s in self.stages]
        if kinds.count("calibrate") > 1:
            raise ValueError("at most one calibrate stage")
        if "calibrate" in kinds and kinds.index("calibrate") != 0:
            raise ValueError("calibrate must be the first stage")
        if "calibrate" in kinds and self.sparsity.plan:
            raise ValueError("sparsity.plan is given, so drop the calibrate stage (or drop sparsity.plan)")
        return self

    @model_validator(mode="after")
    def _sequence_parallel(self):
        # The head-count rules need the model config: rtpurbo_train/parallel/validate.py.
        sp = self.parallel.sequence_parallel_size
        training = [(i, s) for i, s in enumerate(self.stages) if s.type in ("indexer_warmup", "sparse_train")]
        for i, stage in training:
            if stage.seq_len % sp:
                raise ValueError(f"stage {i}-{stage.type}: seq_len {stage.seq_len} is not divisible by "
                                 f"parallel.sequence_parallel_size {sp} (each SP rank holds seq_len / SP tokens)")
        micro = sorted({s.micro_batch_size for _, s in training})
        if sp > 1 and len(micro) > 1:
            raise ValueError(f"with parallel.sequence_parallel_size {sp} every training stage needs the same "
                             f"micro_batch_size (Ulysses fixes it), got {micro}")
        return self

    def stage_names(self) -> list[str]:
        """Unique, stable names: `1-indexer_warmup`, `2-sparse_train`, ..."""
        return [f"{i}-{s.type}" for i, s in enumerate(self.stages)]


__all__ = ["Recipe", "SparsitySettings", "STAGE_TYPES"]
