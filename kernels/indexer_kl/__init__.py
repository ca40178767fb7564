"""Fused indexer KL loss (`indexer_kl_loss`): KL(full attention || indexer attention), forward and
backward without a T x T tensor. Math and layout: README.md beside this file; contract:
docs/INTERFACES.md."""
import math

from ..backend import resolve_backend
from ..indexer_select import check_indexer_pair
from .naive import check_query_block_stride, indexer_kl_loss_reference

__all__ = ["indexer_kl_loss", "indexer_kl_loss_reference"]


def check_kl_inputs(q, k, qi, ki, block_idx, block_cnt, block_size, query_block_stride=1):
    B, T, Hq, Hkv, d = check_indexer_pair(qi, ki)
    check_query_block_stride(query_block_stride)
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be [B, T, H, D]; got {tuple(q.shape)} and {tuple(k.shape)}")
    if tuple(q.shape[:3]) != (B, T, Hq) or tuple(k.shape[:3]) != (B, T, Hkv) or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} / k {tuple(k.shape)} do not match qi {tuple(qi.shape)} / "
                         f"ki {tuple(ki.shape)} in B, T, heads or head dim")
    if q.dtype != k.dtype or qi.dtype != ki.dtype:
        raise ValueError(f"q/k dtypes ({q.dtype}, {k.dtype}) and qi/ki dtypes ({qi.dtype}, {ki.dtype}) must match pairwise")
    if q.device != qi.device or k.device != qi.device:
        raise ValueError("q, k, qi, ki must be on one device")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16 (got {block_size})")
    if (block_idx is None) != (block_cnt is None):
        raise ValueError("block_idx and block_cnt go together")
    if block_idx is not None:
        nqb = math.ceil(T / block_size)
        if block_idx.dim() != 4 or tuple(block_idx.shape[:3]) != (B, Hkv, nqb):
            raise ValueError(f"block_idx must be [B, Hkv, NQB, MAXB] = [{B}, {Hkv}, {nqb}, *]; got {tuple(block_idx.shape)}")
        if tuple(block_cnt.shape) != (B, Hkv, nqb):
            raise ValueError(f"block_cnt must be [B, Hkv, NQB] = [{B}, {Hkv}, {nqb}]; got {tuple(block_cnt.shape)}")
        if block_idx.dtype.is_floating_point or block_cnt.dtype.is_floating_point:
            raise ValueError("block_idx and block_cnt must be integer tensors (int32)")


def indexer_kl_loss(q, k, qi, ki, *, sm_scale, scale=None, block_idx=None, block_cnt=None, block_size=64,
                    backend="auto", query_block_stride: int = 1):
    """Mean over (b, query head, m) of KL(p_full(m) || p_idx(m)); float32 scalar.

    q [B, T, Hq, D], k [B, T, Hkv, D]: RoPE'd full-dim query/key, constants (no gradient);
    qi [B, T, Hq, d], ki [B, T, Hkv, d]: indexer projections (gradients flow here);
    p_full = softmax_{n<=m}(sm_scale q_m.k_n), p_idx = softmax_{n<=m}(scale qi_m.ki_n), scale default
    1/sqrt(d). With block_idx int32 [B, Hkv, NQB, MAXB] / block_cnt int32 [B, Hkv, NQB] both
    distributions are restricted to (and renormalised over) the selected key blocks.

    query_block_stride S (int >= 1): query-block subsampling for long sequences. Only the query
    blocks qb = NQB-1, NQB-1-S, NQB-1-2S, ... >= 0 (NQB = ceil(T / block_size)) enter the mean,
    which then runs over their valid rows m < T (count B * Hq * that many rows); the other rows
    contribute nothing and get exactly zero gradient. Cost ~1/S of the full loss. S = 1 (default):
    every row, today's code path.
    """
    check_kl_inputs(q, k, qi, ki, block_idx, block_cnt, block_size, query_block_stride)
    S = int(query_block_stride)
    scale = 1.0 / math.sqrt(qi.shape[-1]) if scale is None else scale
    backend = resolve_backend(backend, qi.device)
    if backend == "reference":
        return indexer_kl_loss_reference(q, k, qi, ki, sm_scale=sm_scale, scale=scale, block_idx=block_idx,
                                         block_cnt=block_cnt, block_size=block_size, query_block_stride=S)
    from .kl_triton import IndexerKLTriton  # triton is optional on CPU machines
    if block_idx is not None:
        block_idx, block_cnt = block_idx.to(qi.device).int(), block_cnt.to(qi.device).int()
    return IndexerKLTriton.apply(q.detach(), k.detach(), qi, ki, block_idx, block_cnt, float(sm_scale),
                                 float(scale), block_size, S)
