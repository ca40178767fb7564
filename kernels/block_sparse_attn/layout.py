"""Conversions into the block index layout (int32 [B, Hkv, NQB, MAXB], sorted, -1 padded + counts).

`block_index_from_mask` turns a dense block mask into the layout (all torch ops, runs on the
mask's device); `streaming_block_mask` gives the blocks a sink + sliding-window head needs.
"""
from __future__ import annotations

import math

import torch


def block_index_from_mask(block_mask: torch.Tensor, min_width: int = 1):
    """bool [..., NQB, NKB] -> (block_idx int32 [..., NQB, MAXB], block_cnt int32 [..., NQB]).

    MAXB = max(min_width, largest count). Selected blocks come out ascending, padding is -1.
    """
    num_kv_blocks = block_mask.shape[-1]
    cnt = block_mask.sum(dim=-1)
    width = max(min_width, int(cnt.max()) if cnt.numel() else 0)
    ids = torch.arange(num_kv_blocks, device=block_mask.device).expand_as(block_mask)
    # Unselected blocks sort after every selected one, then become -1.
    keyed = torch.where(block_mask, ids, num_kv_blocks)
    ordered = keyed.sort(dim=-1).values[..., :width]
    if ordered.shape[-1] < width:
        pad = torch.full((*ordered.shape[:-1], width - ordered.shape[-1]), num_kv_blocks, device=block_mask.device)
        ordered = torch.cat([ordered, pad], dim=-1)
    block_idx = torch.where(ordered == num_kv_blocks, -1, ordered).to(torch.int32)
    return block_idx.contiguous(), cnt.to(torch.int32)


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
