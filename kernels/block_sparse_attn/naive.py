"""Readable PyTorch reference of block-sparse attention (the CPU training backend and the test oracle).

It applies the contract's visibility rule literally (docs/INTERFACES.md): query `i` sees key `j` iff
`j <= i`, `j // bs` is a selected block of `(b, kv head, i // bs)`, and the KV head has no window or
`i - j < kv_window[h]` or `j < sink_tokens`. A chunk of query rows attends to the key blocks that the
chunk selected under that visibility mask, in float32, through torch's `scaled_dot_product_attention`
(a softmax over the visible keys; fused on CPU, where this is the training backend). `lse`, when asked
for, is the logsumexp of the masked scores, computed separately.

Memory stays bounded: the sequence is processed in chunks of query blocks, and under autograd each
chunk runs inside a non-reentrant `torch.utils.checkpoint`, so the backward recomputes that chunk's
mask instead of keeping it. Saved memory is O(T * D) for the inputs plus O(chunk * T) for the one
chunk being recomputed; T x T per head never exists at once.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..layout import mask_from_block_index

# About 128 MB of float32 scores (or attention-mask entries) per chunk, a few times that in temporaries,
# which a CPU training step can afford at 8K tokens.
_SCORE_ELEMENTS_PER_CHUNK = 1 << 25


def visibility_mask(block_mask: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                    kv_window: torch.Tensor | None, sink_tokens: int, block_size: int) -> torch.Tensor:
    """bool [B, Hkv, Lq, Lk]: the contract's rule for query positions `q_pos` [Lq] and key positions
    `k_pos` [Lk] (global token indices), given the dense `block_mask` [B, Hkv, NQB, NKB]."""
    rows = block_mask[:, :, q_pos // block_size]                # [B, Hkv, Lq, NKB]
    visible = rows[..., k_pos // block_size]                    # [B, Hkv, Lq, Lk]
    visible = visible & (k_pos[None, :] <= q_pos[:, None])
    if kv_window is not None:
        window = kv_window.to(device=q_pos.device, dtype=torch.long)[:, None, None]   # [Hkv, 1, 1]
        distance = (q_pos[:, None] - k_pos[None, :])[None]                           # [1, Lq, Lk]
        in_window = (window <= 0) | (distance < window) | (k_pos[None, None, :] < sink_tokens)
        visible = visible & in_window[None]
    return visible


def _attend_chunk(q_chunk: torch.Tensor, k_heads: torch.Tensor, v_heads: torch.Tensor, k_pos: torch.Tensor,
                  block_mask: torch.Tensor, start: int, kv_window: torch.Tensor | None, sink_tokens: int,
                  block_size: int, sm_scale: float, with_lse: bool):
    """One chunk of query rows (positions start .. start+L-1) against the keys at positions `k_pos` [S].

    q_chunk [B, Hkv, G, L, D]; k_heads, v_heads [B, Hkv, T, D] (whole sequence; only k_pos is read).
    Returns o [B, Hkv, G, L, D] (float32) and lse [B, Hkv, G, L] (float32, -inf on rows that see nothing;
    None unless `with_lse`). The key gather and the mask are built here, not passed in, so that a
    checkpoint keeps no per-chunk copy alive: the backward recomputes them.
    """
    batch, num_kv_heads, group, rows, head_dim = q_chunk.shape
    keys = k_pos.numel()
    q_pos = torch.arange(start, start + rows, device=q_chunk.device)
    visible = visibility_mask(block_mask, q_pos, k_pos, kv_window, sink_tokens, block_size)  # [B,Hkv,L,S]
    k_sel = k_heads.index_select(2, k_pos).float()
    v_sel = v_heads.index_select(2, k_pos).float()

    # Group rows share the KV head: one [G*L, D] x [D, S] product per KV head, no copy of K per query head.
    q_rows = q_chunk.float().reshape(batch, num_kv_heads, group * rows, head_dim)
    # A row that sees nothing attends to every key and is then zeroed: o = 0 and zero gradients there,
    # whatever SDPA would make of a fully masked row.
    blind = ~visible.any(dim=-1, keepdim=True)                                          # [B, Hkv, L, 1]
    mask = (visible | blind)[:, :, None].expand(-1, -1, group, -1, -1).reshape(batch, num_kv_heads, group * rows, keys)
    out = F.scaled_dot_product_attention(q_rows, k_sel, v_sel, attn_mask=mask, scale=sm_scale)
    out = out.view(batch, num_kv_heads, group, rows, head_dim).masked_fill(blind[:, :, None], 0.0)
    if not with_lse:
        return out, None
    with torch.no_grad():
        scores = (torch.matmul(q_rows, k_sel.transpose(-1, -2)) * sm_scale).view(batch, num_kv_heads, group, rows, keys)
        lse = torch.logsumexp(scores.masked_fill(~visible[:, :, None], float("-inf")), dim=-1)  # -inf: sees nothing
    return out, lse


def _chunk_key_positions(block_mask: torch.Tensor, first_block: int, last_block: int, seq_len: int,
                         block_size: int) -> torch.Tensor:
    """Positions [S] of the key blocks that any (batch, head, query block) of the chunk selected, so a
    sparse selection costs only its blocks (the mask still decides what each row sees)."""
    needed = block_mask[:, :, first_block:last_block + 1].any(dim=2).any(dim=1).any(dim=0)     # [NKB]
    needed[last_block + 1:] = False            # never read past the chunk (causality)
    blocks = needed.nonzero().flatten()
    if blocks.numel() == 0:                    # nothing selected: still one key so shapes stay valid
        blocks = torch.zeros(1, dtype=torch.long, device=block_mask.device)
    positions = (blocks[:, None] * block_size + torch.arange(block_size, device=block_mask.device)).flatten()
    return positions[positions < seq_len]


def block_sparse_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                     block_idx: torch.Tensor, block_cnt: torch.Tensor, *,
                                     kv_window: torch.Tensor | None = None, sink_tokens: int = 0,
                                     sm_scale: float | None = None, block_size: int = 64,
                                     chunk_rows: int | None = None, return_lse: bool = True):
    """Block-sparse causal attention in plain PyTorch, differentiable in q, k, v.

    q [B, T, Hq, D]; k, v [B, T, Hkv, D] with Hq = G * Hkv; block_idx int32 [B, Hkv, NQB, MAXB]
    (sorted, unique, -1 padded); block_cnt int32 [B, Hkv, NQB]; kv_window int32 [Hkv] or None.
    `chunk_rows` (a multiple of `block_size`) overrides the automatic chunk length.
    Returns o [B, T, Hq, D] in q.dtype and lse float32 [B, Hq, T] (natural log; no gradient), or None
    with `return_lse=False` (which skips its second pass over the scores).
    """
    batch, seq_len, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_q_heads // num_kv_heads
    scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(head_dim)
    num_blocks = math.ceil(seq_len / block_size)
    if chunk_rows is None:
        rows = _SCORE_ELEMENTS_PER_CHUNK // max(1, batch * num_q_heads * seq_len)
        chunk_rows = max(block_size, rows // block_size * block_size)
    if chunk_rows % block_size:
        raise ValueError(f"chunk_rows={chunk_rows} must be a multiple of block_size={block_size}")

    block_mask = mask_from_block_index(block_idx, block_cnt, num_blocks)
    k_heads = k.permute(0, 2, 1, 3)                                            # [B, Hkv, T, D]
    v_heads = v.permute(0, 2, 1, 3)
    q_heads = q.view(batch, seq_len, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)  # [B,Hkv,G,T,D]
    use_checkpoint = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)

    outs, lses = [], []
    for start in range(0, seq_len, chunk_rows):
        end = min(seq_len, start + chunk_rows)
        k_pos = _chunk_key_positions(block_mask, start // block_size, (end - 1) // block_size, seq_len, block_size)
        args = (q_heads[:, :, :, start:end], k_heads, v_heads, k_pos, block_mask, start, kv_window, sink_tokens,
                block_size, scale, return_lse)
        if use_checkpoint:
            out, lse = checkpoint(_attend_chunk, *args, use_reentrant=False)
        else:
            out, lse = _attend_chunk(*args)
        outs.append(out)
        lses.append(lse)

    o = torch.cat(outs, dim=3).permute(0, 3, 1, 2, 4).reshape(batch, seq_len, num_q_heads, head_dim)
    lse = torch.cat(lses, dim=3).reshape(batch, num_q_heads, seq_len) if return_lse else None
    return o.to(q.dtype), lse
