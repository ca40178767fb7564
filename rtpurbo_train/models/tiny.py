"""Tiny random decoders (Llama, Qwen2, Qwen3, Mistral shapes) for tests and CPU runs.

All have GQA (4 query heads over 2 KV heads), head_dim 64 (the Triton kernels take 64 or 128),
hidden 256, intermediate 512, 2 layers, RoPE theta 1e4, 16K positions, and the byte tokenizer's
vocabulary. `overrides` change any config key at construction (so derived fields such as Qwen's
`layer_types` follow a changed `num_hidden_layers`).
"""
from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, PretrainedConfig, Qwen2Config, Qwen3Config

from ..errors import UserError
from .byte_tokenizer import build_byte_tokenizer

TINY_SHAPE: dict[str, Any] = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=16384,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    tie_word_embeddings=False,
)

# Per family: the config class and what differs from the shared shape.
TINY_FAMILIES: dict[str, tuple[type[PretrainedConfig], dict[str, Any]]] = {
    "tiny-llama": (LlamaConfig, {}),
    "tiny-qwen2": (Qwen2Config, {}),  # q/k/v projections carry a bias in Qwen2
    "tiny-qwen3": (Qwen3Config, {}),  # per-head q_norm / k_norm
    "tiny-mistral": (MistralConfig, {"sliding_window": None}),  # its default 4096 window would cap attention
}


def tiny_config(name: str, vocab_size: int, special_ids: dict[str, int], overrides: dict[str, Any]) -> PretrainedConfig:
    """The config of tiny model `name` with `overrides` applied; unknown override keys are a UserError."""
    config_cls, family = TINY_FAMILIES[name]
    kwargs = {**TINY_SHAPE, **family, "vocab_size": vocab_size, **special_ids}
    known = set(config_cls().to_dict()) | set(kwargs)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise UserError(f"model.overrides: unknown key(s) {unknown} for {name}; valid keys include {sorted(known)}")
    return config_cls(**{**kwargs, **overrides})


def build_tiny_model(name: str, overrides: dict[str, Any], seed: int, dtype: torch.dtype):
    """A randomly initialised tiny model (same seed -> same weights) and its byte tokenizer."""
    tokenizer = build_byte_tokenizer(model_max_length=int(overrides.get("max_position_embeddings", TINY_SHAPE["max_position_embeddings"])))
    special_ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = tiny_config(name, len(tokenizer), special_ids, overrides)
    # fork_rng: the init is reproducible without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model, tokenizer
