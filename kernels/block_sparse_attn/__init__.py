"""Block-sparse causal attention with GQA, per-KV-head sliding window and sink tokens.

One entry point serves retrieval heads (indexer-selected key blocks, no window) and streaming heads
(sink + window blocks, kv_window > 0). Math, index layout and the backward's reverse map: README.md.
"""
from __future__ import annotations

import math

import torch

from ..backend import resolve_backend
from .inputs import check_attention_inputs, check_block_index_values
from .layout import block_index_from_mask, merge_head_blocks, streaming_block_index, streaming_block_mask
from .naive import block_sparse_attention_reference

__all__ = ["block_sparse_attention", "block_sparse_attention_reference", "block_index_from_mask",
           "check_block_index_values", "streaming_block_mask", "streaming_block_index", "merge_head_blocks"]


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor,
                           block_cnt: torch.Tensor, *, kv_window: torch.Tensor | None = None, sink_tokens: int = 0,
                           sm_scale: float | None = None, block_size: int = 64, backend: str = "auto",
                           return_lse: bool = True):
    """Attention where query i sees key j iff j <= i, j's block is selected for (b, kv head, i's block),
    and (no window on the head, or i - j < kv_window[h], or j < sink_tokens).

    q [B, T, Hq, D]; k, v [B, T, Hkv, D], Hq = G * Hkv (the G query heads of a group share the selection);
    block_idx int32 [B, Hkv, NQB, MAXB], NQB = ceil(T / block_size), sorted ascending, unique, -1 padded;
    block_cnt int32 [B, Hkv, NQB]; kv_window int32 [Hkv] (<= 0: no window on that head) or None.
    Returns o [B, T, Hq, D] in q.dtype and lse float32 [B, Hq, T] (natural log of the sum of
    exp(sm_scale * q.k) over visible keys; -inf on a row that sees nothing, whose o is 0), or None with
    `return_lse=False` (the reference then skips computing it; Triton's forward has it anyway).
    Differentiable in q, k, v; lse carries no gradient. backend: "auto" (Triton on CUDA, reference
    elsewhere), "reference" or "triton" (head_dim 64 or 128; fp16, bf16, fp32).
    """
    check_attention_inputs(q, k, v, block_idx, block_cnt, kv_window, sink_tokens, block_size)
    scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if resolve_backend(backend, q.device) == "reference":
        check_block_index_values(block_idx, block_cnt)
        return block_sparse_attention_reference(q, k, v, block_idx, block_cnt, kv_window=kv_window,
                                                sink_tokens=sink_tokens, sm_scale=scale, block_size=block_size,
                                                return_lse=return_lse)
    from .triton_common import check_head_dim
    check_head_dim(q.shape[-1])
    if block_size not in (16, 32, 64, 128):
        raise ValueError(f"the Triton kernels take block_size 16, 32, 64 or 128, got {block_size}")
    from .triton_autograd import block_sparse_attention_triton
    o, lse = block_sparse_attention_triton(q, k, v, block_idx, block_cnt, kv_window, sink_tokens, scale, block_size)
    return o, (lse if return_lse else None)
