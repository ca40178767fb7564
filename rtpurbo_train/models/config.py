"""`model:` section of a recipe."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ModelConfig(BaseModel):
    """Which model to load and how.

    `name_or_path` is one of: a registered name (`smollm2-135m`, `tiny-llama`, `tiny-qwen2`,
    `tiny-qwen3`, `tiny-mistral`), a local Hugging Face folder, or a Hugging Face model id that is
    already in the local HF cache (nothing is downloaded at run time).
    """

    model_config = ConfigDict(extra="forbid")

    name_or_path: str = Field("smollm2-135m", min_length=1)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto = bfloat16 on CUDA, float32 on CPU"
    )
    trust_remote_code: bool = Field(False, description="passed to transformers only when true")
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="config overrides (e.g. num_hidden_layers, num_key_value_heads); each key must exist in the model config",
    )
    seed: int = Field(0, ge=0, description="seed of the random init of tiny models")
