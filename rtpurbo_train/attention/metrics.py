"""Sparsity and attention recall of one layer's sparse selection (measured, never trained on)."""
import torch

from rtpurbo_kernels.layout import mask_from_block_index

from .blocks import causal_block_count


def block_sparsity(cnt: torch.Tensor, seq_len: int, block_size: int) -> torch.Tensor:
    """Fraction of causal key blocks skipped. cnt [B, H, NQB] -> scalar over all given heads."""
    total = causal_block_count(seq_len, block_size) * cnt.shape[0] * cnt.shape[1]
    return 1.0 - cnt.sum().double() / max(total, 1)


def attention_recall(q, k, idx, cnt, kv_window, sink_tokens, scaling, block_size, num_queries):
    """Full-attention mass that falls on the keys the sparse rule keeps, on sampled queries.

    q [B, T, Hq, D], k [B, T, Hkv, D] (RoPE'd), idx [B, Hkv, NQB, MAXB], cnt [B, Hkv, NQB]. Queries are spread evenly
    over the second half of the sequence, where long-range retrieval matters. Returns [Hkv] recall
    averaged over the sampled queries, the batch and the query heads of each group.
    """
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    rows = torch.linspace(T // 2, T - 1, steps=min(num_queries, T - T // 2), device=q.device).long().unique()
    qs = q[:, rows].float()  # [B, R, Hq, D]
    scores = torch.einsum("brhd,bthd->bhrt", qs, k.float().repeat_interleave(G, dim=2)) * scaling
    cols = torch.arange(T, device=q.device)
    causal = cols[None, :] <= rows[:, None]  # [R, T]
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)  # [B, Hq, R, T]

    qb = rows // block_size
    sel = mask_from_block_index(idx[:, :, qb], cnt[:, :, qb], idx.shape[2])  # [B, Hkv, R, NQB]
    visible = sel.repeat_interleave(block_size, dim=-1)[..., :T] & causal  # [B, Hkv, R, T]
    win = kv_window.to(q.device).long()[None, :, None, None]
    dist = rows[:, None] - cols[None, :]
    in_window = (win <= 0) | (dist[None, None] < win) | (cols < sink_tokens)[None, None, None, :]
    visible = (visible & in_window).repeat_interleave(G, dim=1)  # [B, Hq, R, T]
    recall = (probs * visible).sum(-1)  # [B, Hq, R]
    return recall.mean(dim=(0, 2)).view(Hkv, G).mean(-1)
