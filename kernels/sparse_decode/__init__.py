"""One sparse decode step: indexer block selection of the new token (`decode_block_select`) and
attention of one query row per head over a fixed-capacity cache (`decode_attention`).

Every shape is the cache's capacity and positions are device tensors: no host sync, CUDA-graph safe.
Math: README.md beside this file; contract: docs/INTERFACES.md.
"""
import math

import torch

from ..backend import resolve_backend
from .naive import (decode_attention_reference, decode_block_mass_reference, decode_block_select_reference,
                    select_from_decode_mass)

__all__ = ["decode_block_select", "decode_attention", "decode_block_select_reference", "decode_attention_reference",
           "decode_block_mass_reference", "select_from_decode_mass"]


def _check_select(qi, ikeys, pos, carry, block_size):
    if qi.dim() != 4 or ikeys.dim() != 4:
        raise ValueError(f"qi must be [B, H, G, d] and ikeys [B, H, C, d]; got {tuple(qi.shape)}, {tuple(ikeys.shape)}")
    B, H, G, d = qi.shape
    if ikeys.shape[:2] != (B, H) or ikeys.shape[3] != d:
        raise ValueError(f"ikeys {tuple(ikeys.shape)} does not match qi {tuple(qi.shape)}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16 (got {block_size})")
    if ikeys.shape[2] % block_size:
        raise ValueError(f"the cache capacity ({ikeys.shape[2]}) must be a multiple of block_size ({block_size})")
    if tuple(pos.shape) != (B,):
        raise ValueError(f"pos must be [B] = [{B}]; got {tuple(pos.shape)}")
    if tuple(carry.shape) != (B, H, ikeys.shape[2] // block_size):
        raise ValueError(f"carry must be [B, H, C / block_size]; got {tuple(carry.shape)}")


@torch.no_grad()
def decode_block_select(qi, ikeys, pos, carry, *, block_size=64, top_p=0.9, top_k=None, sink_blocks=1,
                        local_blocks=2, scale=None, query_stride=1, backend="auto"):
    """Key blocks the new token at position pos[b] attends to on each retrieval KV head.

    qi [B, H, G, d], ikeys float32 [B, H, C, d], pos int [B], carry float32 [B, H, C // block_size]
    -> (chosen bool [B, H, C // block_size], new_carry float32 [B, H, C // block_size]).
    The rule of `indexer_block_select` for the last query row of a sequence (README.md)."""
    _check_select(qi, ikeys, pos, carry, block_size)
    if top_k is not None and int(top_k) < 1:
        raise ValueError(f"top_k must be >= 1 (got {top_k})")
    if top_k is None and not top_p > 0.0:
        raise ValueError(f"top_p must be > 0 (got {top_p})")
    scale = 1.0 / math.sqrt(qi.shape[-1]) if scale is None else scale
    kwargs = dict(block_size=block_size, top_p=top_p, top_k=top_k, sink_blocks=sink_blocks,
                  local_blocks=local_blocks, scale=scale, query_stride=query_stride)
    if resolve_backend(backend, qi.device) == "reference":
        return decode_block_select_reference(qi, ikeys, pos, carry, **kwargs)
    from .select_triton import decode_block_select_triton  # triton is optional on CPU machines
    return decode_block_select_triton(qi, ikeys, pos, carry, **kwargs)


@torch.no_grad()
def decode_attention(q, k, v, lengths, block_mask=None, *, block_size=64, scale=None, backend="auto"):
    """q [B, H, G, D], k/v [B, H, C, D], lengths int [B], block_mask bool [B, H, ceil(C / bs)] or None
    -> [B, H, G, D] (q.dtype): softmax attention over the slots n < lengths[b] of the chosen blocks."""
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"q must be [B, H, G, D] and k, v [B, H, C, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if tuple(lengths.shape) != (q.shape[0],):
        raise ValueError(f"lengths must be [B]; got {tuple(lengths.shape)}")
    if block_mask is not None and tuple(block_mask.shape) != (*q.shape[:2], -(-k.shape[2] // block_size)):
        raise ValueError(f"block_mask must be [B, H, ceil(C / block_size)]; got {tuple(block_mask.shape)}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if resolve_backend(backend, q.device) == "reference":
        return decode_attention_reference(q, k, v, lengths, block_mask, block_size=block_size, scale=scale)
    from .attention_triton import decode_attention_triton
    return decode_attention_triton(q, k, v, lengths, block_mask, block_size=block_size, scale=scale)
