"""The sparse-attention settings of an exported RTPurbo model, read from the `rtpurbo` section of config.json.

Shipped inside every export folder (with modeling_rtpurbo.py and cache_rtpurbo.py); imports only the
standard library. This is deliberately NOT a `PreTrainedConfig`: the folder's config.json keeps the base
model's `model_type`, so `AutoConfig` returns the base config class (LlamaConfig, Qwen3Config, ...) with
or without `trust_remote_code`, and engines that know nothing of RTPurbo load the plain model. The
sparse model class reads its settings from that base config with `RTPurboSparsityConfig.from_model_config`.

config.json layout written by `rtpurbo_train.export`:
    "rtpurbo": {"format": 1,
                "plan": {...the SparsityPlan, heads in the exported (original) order...},
                "sink_blocks": int, "local_blocks": int, "indexer_scale": float},
    "headwise_config": {"sink_token_num", "swa_token_num", "seqlen_threshold", "0": [0/1 per query head], ...}
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

RTPURBO_FORMAT = 1
INDEXER_WEIGHTS_NAME = "rtpurbo_indexer.safetensors"


def _head_layout(config) -> tuple[int, int, int, int]:
    """(num_layers, num_q_heads, num_kv_heads, head_dim) of a decoder config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, heads, kv_heads, head_dim


@dataclass(frozen=True)
class RTPurboSparsityConfig:
    """Everything the sparse attention needs at inference; validated against the model's head layout.

    `retrieval_kv_heads[i]` are the retrieval KV heads of layer i (sorted); their query heads are
    `h * group + j`. Every other KV head is a streaming head (sink + window).
    """

    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    sink_tokens: int
    window: int
    indexer_dim: int
    top_p: float
    top_k: Optional[int]
    seqlen_threshold: int
    sink_blocks: int
    local_blocks: int
    indexer_scale: float
    retrieval_kv_heads: tuple[tuple[int, ...], ...]
    # A query block's selection averages its rows m % query_stride == query_stride - 1 and its last row
    # (1 = every row; folders exported before the setting existed use 1).
    query_stride: int = 1

    @property
    def group(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    def retrieval_q_heads(self, layer: int) -> list[int]:
        g = self.group
        return [h * g + j for h in self.retrieval_kv_heads[layer] for j in range(g)]

    def streaming_kv_heads(self, layer: int) -> list[int]:
        chosen = set(self.retrieval_kv_heads[layer])
        return [h for h in range(self.num_kv_heads) if h not in chosen]

    @classmethod
    def from_model_config(cls, config) -> "RTPurboSparsityConfig":
        """Parse `config.rtpurbo`; a missing or inconsistent section raises ValueError naming the problem."""
        section = getattr(config, "rtpurbo", None)
        if not isinstance(section, dict):
            raise ValueError("config.json has no `rtpurbo` section: this folder was not written by rtpurbo_train.export")
        if section.get("format") != RTPURBO_FORMAT:
            raise ValueError(f"rtpurbo section format {section.get('format')!r} is not supported (expected {RTPURBO_FORMAT})")
        plan = section.get("plan")
        if not isinstance(plan, dict) or not isinstance(plan.get("layers"), list) or not isinstance(plan.get("model"), dict):
            raise ValueError("rtpurbo.plan is missing or malformed (needs `model` and `layers`)")
        if plan.get("kv_head_permutation") is not None:
            raise ValueError("rtpurbo.plan.kv_head_permutation is set: exported weights must be in the original head order")

        num_layers, num_q, num_kv, head_dim = _head_layout(config)
        layout = plan["model"]
        expected = {"num_layers": num_layers, "num_q_heads": num_q, "num_kv_heads": num_kv, "head_dim": head_dim}
        wrong = {k: (layout.get(k), v) for k, v in expected.items() if layout.get(k) != v}
        if wrong:
            raise ValueError(f"rtpurbo.plan was made for another head layout: (plan, model) = {wrong}")
        if len(plan["layers"]) != num_layers:
            raise ValueError(f"rtpurbo.plan has {len(plan['layers'])} layers, the model {num_layers}")
        retrieval = []
        for i, layer in enumerate(plan["layers"]):
            heads = [int(h) for h in layer.get("retrieval_kv_heads", [])]
            if heads != sorted(set(heads)) or any(h < 0 or h >= num_kv for h in heads):
                raise ValueError(f"rtpurbo.plan layer {i}: retrieval_kv_heads {heads} must be sorted, unique, in [0, {num_kv})")
            retrieval.append(tuple(heads))

        block_size = int(plan.get("block_size", 64))
        sink_tokens = int(plan.get("sink_tokens", 4))
        indexer_dim = int(plan.get("indexer_dim", 16))
        top_k = plan.get("top_k")
        settings = cls(
            num_layers=num_layers, num_q_heads=num_q, num_kv_heads=num_kv, head_dim=head_dim,
            block_size=block_size, sink_tokens=sink_tokens, window=int(plan.get("window", 1024)),
            indexer_dim=indexer_dim, top_p=float(plan.get("top_p", 0.9)),
            top_k=None if top_k is None else int(top_k), seqlen_threshold=int(plan.get("seqlen_threshold", 0)),
            sink_blocks=int(section.get("sink_blocks", max(1, math.ceil(sink_tokens / block_size)))),
            local_blocks=int(section.get("local_blocks", 2)),
            indexer_scale=float(section.get("indexer_scale", 1.0 / math.sqrt(indexer_dim))),
            retrieval_kv_heads=tuple(retrieval), query_stride=int(plan.get("query_stride", 1)),
        )
        settings._check_ranges()
        return settings

    def _check_ranges(self) -> None:
        problems = []
        if self.block_size <= 0:
            problems.append(f"block_size {self.block_size} must be > 0")
        if self.window <= 0:
            problems.append(f"window {self.window} must be > 0")
        if self.sink_tokens < 0 or self.sink_blocks < 0 or self.local_blocks < 0:
            problems.append("sink_tokens, sink_blocks and local_blocks must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p {self.top_p} must be in (0, 1]")
        qs = self.query_stride
        if qs < 1 or qs > self.block_size or qs & (qs - 1):
            problems.append(f"query_stride {qs} must be a power of two in [1, block_size]")
        if self.top_k is not None and self.top_k < 1:
            problems.append(f"top_k {self.top_k} must be >= 1")
        if problems:
            raise ValueError("rtpurbo.plan: " + "; ".join(problems))
