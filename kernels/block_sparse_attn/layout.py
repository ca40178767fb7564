"""Conversions into the block index layout (int32 [B, Hkv, NQB, MAXB], sorted, -1 padded + counts).

`block_index_from_mask` (kernels/layout.py) turns a dense block mask into the layout;
`streaming_block_mask` gives the blocks a sink + sliding-window head needs, `streaming_block_index`
the same as a (cached, sync-free) index; `merge_head_blocks` builds one layer's index from the
streaming rows and the retrieval heads' selection. Used by the training attention and the exported
model's kernel prefill alike.
"""
from __future__ import annotations

import functools
import math

import torch

from ..layout import block_index_from_mask  # noqa: F401 (re-exported)


def streaming_block_mask(seq_len: int, window: int, sink_tokens: int, block_size: int = 64,
                         device=None) -> torch.Tensor:
    """bool [NQB, NQB]: the key blocks a query block needs under sink + sliding window (window <= 0:
    all causal blocks). Pair it with kv_window[h] = window for token-exact edges."""
    num_blocks = math.ceil(seq_len / block_size)
    qb = torch.arange(num_blocks, device=device)[:, None]
    kb = torch.arange(num_blocks, device=device)[None, :]
    causal = kb <= qb
    if window <= 0:
        return causal
    # Query block qb's earliest query is qb*bs; its window reaches back to qb*bs - window + 1.
    in_window = (kb * block_size + block_size - 1) >= (qb * block_size - window + 1)
    sink = kb * block_size < sink_tokens
    return causal & (in_window | sink)


def streaming_width(num_blocks: int, window: int, sink_tokens: int, block_size: int) -> int:
    """An upper bound of the blocks per row of `streaming_block_mask`, from the settings alone."""
    if window <= 0:
        return num_blocks
    sink_blocks = math.ceil(sink_tokens / block_size)
    return max(1, min(num_blocks, sink_blocks + math.ceil(max(window - 1, 0) / block_size) + 1))


@functools.lru_cache(maxsize=16)
def streaming_block_index(seq_len: int, window: int, sink_tokens: int, block_size: int = 64, device=None):
    """(idx int32 [NQB, W], cnt int32 [NQB]) of `streaming_block_mask`, W = `streaming_width` (no device
    sync). Cached: every layer of a forward asks for the same lists (callers must not modify them)."""
    mask = streaming_block_mask(seq_len, window, sink_tokens, block_size, device=device)
    width = streaming_width(mask.shape[-1], window, sink_tokens, block_size)
    return block_index_from_mask(mask, width=width)


def merge_head_blocks(stream: tuple[torch.Tensor, torch.Tensor], retrieval: tuple[torch.Tensor, torch.Tensor] | None,
                      retrieval_heads: torch.Tensor, batch: int, num_kv_heads: int):
    """One (idx [B, Hkv, NQB, MAXB], cnt [B, Hkv, NQB]) for a layer: streaming rows (idx [NQB, Ws],
    cnt [NQB]) for every KV head, then retrieval rows (idx [B, Hkv_r, NQB, Wr]) written over the heads
    `retrieval_heads` (int64 [Hkv_r], on the device). Fixed-shape ops only: no device sync."""
    s_idx, s_cnt = stream
    width = s_idx.shape[-1] if retrieval is None else max(s_idx.shape[-1], retrieval[0].shape[-1])
    nqb = s_idx.shape[0]
    idx = torch.full((batch, num_kv_heads, nqb, width), -1, dtype=torch.int32, device=s_idx.device)
    idx[..., : s_idx.shape[-1]] = s_idx
    cnt = s_cnt.expand(batch, num_kv_heads, nqb).clone()
    if retrieval is not None and retrieval_heads.numel():
        r_idx, r_cnt = retrieval
        rows = torch.full((batch, r_idx.shape[1], nqb, width), -1, dtype=torch.int32, device=s_idx.device)
        rows[..., : r_idx.shape[-1]] = r_idx
        # index_copy_, not idx[:, heads] = ...: advanced-index assignment waits for the GPU
        idx.index_copy_(1, retrieval_heads, rows)
        cnt.index_copy_(1, retrieval_heads, r_cnt.to(cnt.dtype))
    return idx, cnt
