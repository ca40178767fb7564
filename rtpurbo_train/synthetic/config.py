"""Settings of the synthetic tasks: per-task options and the training mix (`data.synthetic`)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

TaskName = Literal["passkey", "single_needle", "multikey", "multivalue", "vartrack"]
ValueKind = Literal["number", "word", "uuid"]


class TaskOptions(BaseModel):
    """Shape of the tasks (RULER-like defaults, small enough for short answers)."""

    model_config = ConfigDict(extra="forbid")

    num_keys: int = Field(4, ge=1, le=64, description="multikey: needles, one of them queried")
    num_values: int = Field(3, ge=1, le=16, description="multivalue: values under the one key")
    num_hops: int = Field(3, ge=1, le=16, description="vartrack: variables in each assignment chain")
    num_chains: int = Field(2, ge=1, le=8, description="vartrack: chains (one queried, the rest distractors)")
    digits: int = Field(5, ge=2, le=12, description="digits of number values")
    key_kinds: list[ValueKind] = Field(default_factory=lambda: ["word"], min_length=1, description="multikey/multivalue keys")
    value_kinds: list[ValueKind] = Field(
        default_factory=lambda: ["number", "word", "uuid"], min_length=1, description="multikey values (one kind per example)"
    )


class SyntheticConfig(BaseModel):
    """A stream of generated long-context examples, mixed into training data with `weight`.

    Example `i` is fully determined by (`seed`, `i`): its task (drawn by `tasks` weights), length,
    depth, values and haystack. A document is the prompt followed by its answer.
    """

    model_config = ConfigDict(extra="forbid")

    tasks: dict[TaskName, float] = Field(
        default_factory=lambda: {"passkey": 1.0, "multikey": 1.0, "multivalue": 1.0, "vartrack": 1.0},
        description="task -> relative weight",
    )
    context_tokens: Optional[list[int]] = Field(
        None, description="prompt lengths drawn from; None = fill the training sequence (seq_len minus room for the answer)"
    )
    depths: Optional[list[float]] = Field(None, description="needle depths drawn from; None = uniform in [0, 1]")
    num_documents: int = Field(256, ge=1, description="documents in one pass over the synthetic source")
    seed: int = Field(0, ge=0)
    weight: float = Field(1.0, gt=0, description="weight of this source in the data mixture")
    haystack: Literal["generated", "sources"] = Field(
        "generated", description="built-in filler, or the texts of the data sources"
    )
    options: TaskOptions = Field(default_factory=TaskOptions)

    @field_validator("tasks")
    @classmethod
    def _positive_weights(cls, tasks):
        if not tasks:
            raise ValueError("tasks must name at least one task")
        bad = {k: w for k, w in tasks.items() if not w > 0}
        if bad:
            raise ValueError(f"task weights must be > 0, got {bad}")
        return tasks

    @field_validator("context_tokens")
    @classmethod
    def _lengths(cls, lengths):
        if lengths is not None and (not lengths or min(lengths) < 64):
            raise ValueError("context_tokens must be a non-empty list of lengths >= 64")
        return lengths

    @field_validator("depths")
    @classmethod
    def _depths(cls, depths):
        if depths is not None and (not depths or any(not 0.0 <= d <= 1.0 for d in depths)):
            raise ValueError("depths must be a non-empty list of values in [0, 1]")
        return depths
