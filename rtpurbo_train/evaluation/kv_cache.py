"""KV-cache bytes of the dense and the sparse model (analytic, from the plan's head layout).

Dense: every layer keeps K and V for every KV head and every token:
`2 * layers * kv_heads * head_dim * dtype_bytes * tokens`.
Sparse: retrieval KV heads keep every token, streaming KV heads only sink + window tokens
(`SparsityPlan.kv_cache_fraction`). Indexer keys (16 dims per retrieval KV head) are not counted:
the public engine recomputes them from the cached keys.
"""
from __future__ import annotations

import torch

from ..plan import SparsityPlan


def dense_kv_cache_bytes(plan: SparsityPlan, tokens: int, dtype_bytes: int) -> int:
    m = plan.model
    return 2 * m.num_layers * m.num_kv_heads * m.head_dim * dtype_bytes * tokens


def kv_cache_bytes(plan: SparsityPlan, tokens: int, dtype: torch.dtype) -> dict[str, float]:
    """{'dense_bytes', 'sparse_bytes', 'fraction'} at `tokens` cached tokens for a cache in `dtype`."""
    if tokens <= 0:
        raise ValueError(f"tokens must be positive, got {tokens}")
    dense = dense_kv_cache_bytes(plan, tokens, torch.tensor([], dtype=dtype).element_size())
    fraction = plan.kv_cache_fraction(tokens)
    return {"dense_bytes": float(dense), "sparse_bytes": float(round(dense * fraction)), "fraction": fraction}


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024.0
    return f"{n:.2f} GiB"
