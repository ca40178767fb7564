"""PyTorch reference for the indexer KL loss (the CPU backend and the tests' reference).

Memory-bounded: scores are built for a chunk of query blocks at a time, and each chunk runs under
activation checkpointing, so autograd keeps no T x T tensor for the backward either. With
`query_block_stride` S > 1 only the sampled query blocks (`sampled_query_blocks`) get scores at all.
"""
import math
import numbers

import torch
from torch.utils.checkpoint import checkpoint

from ..indexer_select.naive import rows_per_chunk
from ..layout import mask_from_block_index


def check_query_block_stride(query_block_stride):
    """S must be a (non-bool) int >= 1; returns it as an int, else raises ValueError."""
    S = query_block_stride
    if isinstance(S, bool) or not isinstance(S, numbers.Integral) or S < 1:
        raise ValueError(f"query_block_stride must be an int >= 1 (got {S!r})")
    return int(S)


def sampled_query_blocks(num_blocks, query_block_stride):
    """Query blocks the KL loss averages over, ascending (Python ints): NQB-1, NQB-1-S, ... >= 0
    (the last block always, then every S-th block counting backwards). S = 1: every block."""
    return list(range((num_blocks - 1) % query_block_stride, num_blocks, query_block_stride))


def sampled_row_count(T, block_size, query_block_stride):
    """Number of valid rows m < T inside the sampled query blocks (a Python int, no device sync):
    every sampled block is full except the last block of the sequence, which is always sampled."""
    nqb = math.ceil(T / block_size)
    n_sampled = (nqb - 1) // query_block_stride + 1
    return (n_sampled - 1) * block_size + (T - (nqb - 1) * block_size)


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


def row_chunks(T, step, block_size, query_block_stride, device):
    """-> [(row selector, rows [R] global indices, r1 = last row + 1)]: the query rows the loss covers,
    in chunks of at most `step` rows (whole query blocks). S = 1: contiguous slices (today's path);
    S > 1: the sampled blocks, `per` of them per chunk, gathered by an index tensor."""
    if query_block_stride == 1:
        bounds = [(r0, min(T, r0 + step)) for r0 in range(0, T, step)]
        return [(slice(r0, r1), torch.arange(r0, r1, device=device), r1) for r0, r1 in bounds]
    blocks = sampled_query_blocks(math.ceil(T / block_size), query_block_stride)
    per = max(1, step // block_size)
    chunks = []
    for i in range(0, len(blocks), per):
        group = blocks[i:i + per]  # an arithmetic progression: built on the device without a copy
        starts = (torch.arange(len(group), device=device) * query_block_stride + group[0]) * block_size
        rows = (starts[:, None] + torch.arange(block_size, device=device)).reshape(-1)
        r1 = min(T, (group[-1] + 1) * block_size)
        rows = rows[:rows.numel() - ((group[-1] + 1) * block_size - r1)]  # only the sequence's last block is partial
        chunks.append((rows, rows, r1))
    return chunks


def indexer_kl_loss_reference(q, k, qi, ki, *, sm_scale, scale=None, block_idx=None, block_cnt=None,
                              block_size=64, query_block_stride=1):
    """Reference `indexer_kl_loss`: mean over (b, query head, valid rows m of the sampled query blocks)
    of KL(p_full(m) || p_idx(m)).

    q [B, T, Hq, D], k [B, T, Hkv, D] (detached: constants), qi [B, T, Hq, d], ki [B, T, Hkv, d];
    optional block_idx int32 [B, Hkv, NQB, MAXB] / block_cnt int32 [B, Hkv, NQB] restrict both
    distributions to the selected blocks. query_block_stride S: only the query blocks NQB-1, NQB-1-S,
    ... >= 0 are averaged over (and get scores); other rows get exactly zero gradient. Returns a
    float32 scalar, differentiable in qi and ki.
    """
    S = check_query_block_stride(query_block_stride)
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
    for sel, rows, r1 in row_chunks(T, step, bs, S, qi.device):
        cols = torch.arange(r1, device=qi.device)  # causal: no key past the chunk's last row
        visible = token_visibility(rows, cols, block_mask, bs)
        if visible.dim() == 4:
            visible = visible.repeat_interleave(G, dim=1)
        args = (qf[:, :, sel], kf[:, :, :r1], qit[:, :, sel], kit[:, :, :r1], visible, sm_scale, scale)
        if torch.is_grad_enabled() and (qi.requires_grad or ki.requires_grad):
            total = total + checkpoint(chunk_kl_sum, *args, use_reentrant=False)
        else:
            total = total + chunk_kl_sum(*args)
    return total / (B * Hq * sampled_row_count(T, bs, S))
