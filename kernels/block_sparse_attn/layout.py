"""Conversions into the block index layout (int32 [B, Hkv, NQB, MAXB], sorted, -1 padded + counts).

`block_index_from_mask` (kernels/layout.py) turns a dense block mask into the layout;
`streaming_block_mask` gives the blocks a sink + sliding-window head needs.
"""
from __future__ import annotations

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
