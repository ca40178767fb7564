"""Indexer block scores + top-p / top-k block selection (`indexer_block_select`).

Layout and math: README.md beside this file; contract: docs/INTERFACES.md.
"""
import torch

from ..backend import resolve_backend
from .naive import block_mass_reference, indexer_block_select_reference
from .select import block_index_from_mask, mask_from_block_index, select_blocks_from_mass, selection_width

__all__ = ["indexer_block_select", "indexer_block_select_reference", "block_mass_reference",
           "select_blocks_from_mass", "block_index_from_mask", "mask_from_block_index"]


def check_indexer_pair(qi, ki, name_q="qi", name_k="ki"):
    """Shapes [B, T, Hq, d] and [B, T, Hkv, d] with Hq a multiple of Hkv; returns (B, T, Hq, Hkv, d)."""
    if qi.dim() != 4 or ki.dim() != 4:
        raise ValueError(f"{name_q} and {name_k} must be [B, T, H, d]; got {tuple(qi.shape)} and {tuple(ki.shape)}")
    B, T, Hq, d = qi.shape
    if ki.shape[0] != B or ki.shape[1] != T or ki.shape[3] != d:
        raise ValueError(f"{name_k} {tuple(ki.shape)} does not match {name_q} {tuple(qi.shape)} in B, T or d")
    Hkv = ki.shape[2]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    if T == 0:
        raise ValueError("empty sequence (T = 0)")
    if qi.device != ki.device:
        raise ValueError(f"{name_q} on {qi.device} but {name_k} on {ki.device}")
    return B, T, Hq, Hkv, d


def check_query_stride(query_stride, block_size) -> int:
    """A power of two in [1, block_size]; returns it as an int."""
    if isinstance(query_stride, bool) or int(query_stride) != query_stride or not 1 <= query_stride <= block_size \
            or int(query_stride) & (int(query_stride) - 1):
        raise ValueError(f"query_stride must be a power of two in [1, block_size={block_size}] (got {query_stride!r})")
    return int(query_stride)


@torch.no_grad()
def indexer_block_select(qi, ki, *, top_p=0.9, top_k=None, block_size=64, sink_blocks=1, local_blocks=2,
                         scale=None, query_stride=1, backend="auto"):
    """Select key blocks per (batch, KV head, query block) from the indexer's attention mass.

    qi [B, T, Hq_r, d], ki [B, T, Hkv_r, d] (query heads of a KV group contiguous) ->
    block_idx int32 [B, Hkv_r, NQB, MAXB] (sorted ascending, unique, -1 padded),
    block_cnt int32 [B, Hkv_r, NQB]. Not differentiable. See README.md for the math.
    `query_stride` S: each block's mass averages its rows m with m % S == S - 1 and its last row
    (S times cheaper); 1 averages every row (the exact token-level oracle).
    """
    check_indexer_pair(qi, ki)
    if top_k is None and not top_p > 0.0:
        raise ValueError(f"top_p must be > 0 (got {top_p}); top_p >= 1 keeps every causal block")
    if top_k is not None and int(top_k) < 1:
        raise ValueError(f"top_k must be >= 1 (got {top_k})")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16 (got {block_size})")
    if sink_blocks < 0 or local_blocks < 0:
        raise ValueError("sink_blocks and local_blocks must be >= 0")
    query_stride = check_query_stride(query_stride, block_size)
    backend = resolve_backend(backend, qi.device)
    rule = dict(top_p=top_p, top_k=top_k, sink_blocks=sink_blocks, local_blocks=local_blocks)
    if backend == "reference":
        mass = block_mass_reference(qi, ki, block_size=block_size, scale=scale, query_stride=query_stride)
        return select_blocks_from_mass(mass, **rule)
    from .block_mass_triton import block_mass_triton  # triton is optional on CPU machines
    from .select_triton import MAX_ROW_BLOCKS, select_blocks_triton

    mass = block_mass_triton(qi, ki, block_size=block_size, scale=scale, query_stride=query_stride)
    nqb = mass.shape[-1]
    width = selection_width(nqb, top_k, sink_blocks, local_blocks)
    if width is None or nqb > MAX_ROW_BLOCKS:  # rows too long for registers: the torch selection
        return select_blocks_from_mass(mass, **rule)
    return select_blocks_triton(mass, width=width, **rule)
