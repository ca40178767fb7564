"""PyTorch reference for the indexer KL loss (the CPU backend and the tests' reference).

Memory-bounded: scores are built for a chunk of query blocks at a time, and each chunk runs under
activation checkpointing, so autograd keeps no T x T tensor for the backward either.
"""
import math

import torch
from torch.utils.checkpoint import checkpoint

from ..indexer_select.naive import rows_per_chunk
from ..layout import mask_from_block_index


def token_visibility(rows, cols, block_mask, block_size):
    """Visible (query, key) pairs for one chunk.

    rows [R], cols [N] global token indices; block_mask bool [B, Hkv, NQB, NQB] or None ->
    bool [R, N] (dense causal) or [B, Hkv, R, N] (causal and the key's block selected).
    """
    causal = cols[None, :] <= rows[:, None]
    if block_mask is None:
        return causal
    selected = block_mask[:, :, rows // block_size][:, :, :, cols // block_size]
    return selected & causal


def chunk_kl_sum(q, k, qi, ki, visible, sm_scale, scale):
    """Sum over the chunk's rows and heads of KL(p_full || p_idx).

    q [B, Hq, R, D], k [B, Hq, N, D] (constants), qi [B, Hq, R, d], ki [B, Hq, N, d],
    visible bool broadcastable to [B, Hq, R, N]. Rows with no visible key contribute 0.
    """
    s_full = sm_scale * torch.matmul(q, k.transpose(-1, -2))
    s_idx = scale * torch.matmul(qi.float(), ki.float().transpose(-1, -2))
    s_full = s_full.masked_fill(~visible, float("-inf"))
    s_idx = s_idx.masked_fill(~visible, float("-inf"))
    logp_full = torch.log_softmax(s_full, dim=-1)
    logp_idx = torch.log_softmax(s_idx, dim=-1)
    p_full = logp_full.exp()  # 0 where invisible; NaN rows (nothing visible) are zeroed below
    term = torch.where(visible & (p_full > 0), p_full * (logp_full - logp_idx), 0.0)
    return term.sum()


def indexer_kl_loss_reference(q, k, qi, ki, *, sm_scale, scale=None, block_idx=None, block_cnt=None,
                              block_size=64):
    """Reference `indexer_kl_loss`: mean over (b, query head, m) of KL(p_full(m) || p_idx(m)).

    q [B, T, Hq, D], k [B, T, Hkv, D] (detached: constants), qi [B, T, Hq, d], ki [B, T, Hkv, d];
    optional block_idx int32 [B, Hkv, NQB, MAXB] / block_cnt int32 [B, Hkv, NQB] restrict both
    distributions to the selected blocks. Returns a float32 scalar, differentiable in qi and ki.
    """
    B, T, Hq, d = qi.shape
    Hkv = ki.shape[2]
    G = Hq // Hkv
    bs = block_size
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    block_mask = None
    if block_idx is not None:
        block_mask = mask_from_block_index(block_idx, block_cnt, math.ceil(T / bs))

    # [B, H, T, dim] layouts; each query head reads its group's KV head.
    qf = q.detach().float().transpose(1, 2)
    kf = k.detach().float().transpose(1, 2).repeat_interleave(G, dim=1)
    qit = qi.transpose(1, 2)
    kit = ki.transpose(1, 2).repeat_interleave(G, dim=1)
    total = torch.zeros((), dtype=torch.float32, device=qi.device)
    step = rows_per_chunk(B * Hq, T, bs)
    for r0 in range(0, T, step):
        r1 = min(T, r0 + step)
        rows = torch.arange(r0, r1, device=qi.device)
        cols = torch.arange(r1, device=qi.device)  # causal: no key past the chunk's last row
        visible = token_visibility(rows, cols, block_mask, bs)
        if visible.dim() == 4:
            visible = visible.repeat_interleave(G, dim=1)
        args = (qf[:, :, r0:r1], kf[:, :, :r1], qit[:, :, r0:r1], kit[:, :, :r1], visible, sm_scale, scale)
        if torch.is_grad_enabled() and (qi.requires_grad or ki.requires_grad):
            total = total + checkpoint(chunk_kl_sum, *args, use_reentrant=False)
        else:
            total = total + chunk_kl_sum(*args)
    return total / (B * Hq * T)
