"""Argument checks shared by both backends, so a bad call fails with the same clear message on each."""
from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_attention_inputs(q, k, v, block_idx, block_cnt, kv_window, sink_tokens, block_size) -> None:
    """Shapes, dtypes and devices of a `block_sparse_attention` call (no device sync: values of
    block_idx are not read; `check_block_index_values` does that where it is cheap)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, T, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    batch, seq_len, num_q_heads, head_dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[1] != seq_len or k.shape[3] != head_dim:
        raise ValueError(f"k and v must be [B={batch}, T={seq_len}, Hkv, D={head_dim}]; "
                         f"got k {tuple(k.shape)}, v {tuple(v.shape)}")
    num_kv_heads = k.shape[2]
    if num_kv_heads == 0 or num_q_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_q_heads}) must be a multiple of KV heads ({num_kv_heads})")
    if q.dtype not in FLOAT_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one of {FLOAT_DTYPES}; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device == block_idx.device == block_cnt.device):
        raise ValueError("q, k, v, block_idx and block_cnt must be on one device")
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int; got {block_size!r}")
    num_blocks = math.ceil(seq_len / block_size)
    if block_idx.dtype != torch.int32 or block_idx.dim() != 4 or tuple(block_idx.shape[:3]) != (
            batch, num_kv_heads, num_blocks) or block_idx.shape[3] < 1:
        raise ValueError(f"block_idx must be int32 [B={batch}, Hkv={num_kv_heads}, NQB={num_blocks}, MAXB>=1]; "
                         f"got {block_idx.dtype} {tuple(block_idx.shape)}")
    if block_cnt.dtype != torch.int32 or tuple(block_cnt.shape) != (batch, num_kv_heads, num_blocks):
        raise ValueError(f"block_cnt must be int32 [B={batch}, Hkv={num_kv_heads}, NQB={num_blocks}]; "
                         f"got {block_cnt.dtype} {tuple(block_cnt.shape)}")
    if kv_window is not None:
        if not isinstance(kv_window, torch.Tensor) or kv_window.dtype != torch.int32 or tuple(
                kv_window.shape) != (num_kv_heads,):
            raise ValueError(f"kv_window must be None or an int32 tensor [Hkv={num_kv_heads}]; got {kv_window!r}")
        if kv_window.device != q.device:
            raise ValueError(f"kv_window is on {kv_window.device}, q on {q.device}")
    if not isinstance(sink_tokens, int) or sink_tokens < 0:
        raise ValueError(f"sink_tokens must be an int >= 0; got {sink_tokens!r}")


def check_block_index_values(block_idx: torch.Tensor, block_cnt: torch.Tensor) -> None:
    """The layout's value rules: 0 <= count <= MAXB; the first `count` entries are causal
    (0 <= kb <= qb) and strictly ascending; the rest are -1. Reads the tensors (syncs on GPU)."""
    maxb = block_idx.shape[-1]
    num_blocks = block_idx.shape[2]
    if bool(((block_cnt < 0) | (block_cnt > maxb)).any()):
        raise ValueError(f"block_cnt must lie in [0, MAXB={maxb}]")
    in_count = torch.arange(maxb, device=block_idx.device) < block_cnt[..., None]
    q_block = torch.arange(num_blocks, device=block_idx.device)[:, None]
    bad_value = in_count & ((block_idx < 0) | (block_idx > q_block))
    if bool(bad_value.any()):
        raise ValueError("block_idx entries within block_cnt must be causal key blocks 0 <= kb <= qb")
    if bool((~in_count & (block_idx != -1)).any()):
        raise ValueError("block_idx entries past block_cnt must be -1")
    if maxb > 1:
        rising = block_idx[..., 1:] > block_idx[..., :-1]
        if bool((in_count[..., 1:] & ~rising).any()):
            raise ValueError("block_idx entries within block_cnt must be strictly ascending (sorted, unique)")
