"""PyTorch reference for one sparse decode step (the CPU backend and the tests' oracle).

Fixed shapes: every tensor spans the cache's whole capacity C and the position of the new token is a
device tensor, so a decode step never syncs with the host and can be captured in a CUDA graph. The
math is in README.md beside this file.
"""
import math

import torch

from ..indexer_select.select import choose_blocks


def decode_block_mass_reference(qi, ikeys, pos, carry, *, block_size, scale=None, query_stride=1):
    """Block mass of the new token's indexer query, plus the open block's strided mass.

    qi [B, H, G, d] (the G query heads of each KV head), ikeys [B, H, C, d] (slot n = position n; slots
    past pos[b] are ignored), pos int [B] (position t of the new token, whose key is slot t), carry
    float32 [B, H, NKB] (NKB = C // block_size) = the summed mass of the earlier sampled queries of t's
    query block (read only when t % block_size != 0).
    Returns (mass float32 [B, H, NKB]: mean over the sampled queries of t's block (the strided ones seen
    so far and t) and the G heads of the softmax mass per key block, 0 past t's block;
    new_carry float32 [B, H, NKB]: carry + t's own summed mass when t is strided (t % S == S - 1), else
    carry; 0 when t starts a block and is not strided)."""
    B, H, G, d = qi.shape
    C = ikeys.shape[2]
    bs, S = block_size, query_stride
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    t = pos.long().view(B, 1, 1, 1)
    scores = scale * torch.matmul(qi.float(), ikeys.float().transpose(-1, -2))  # [B, H, G, C]
    slots = torch.arange(C, device=qi.device)
    scores = scores.masked_fill(slots > t, float("-inf"))
    own = torch.softmax(scores, dim=-1).view(B, H, G, C // bs, bs).sum(dim=(2, 4))  # [B, H, NKB]
    t = pos.long().view(B, 1, 1)
    base = torch.where(t % bs == 0, torch.zeros_like(carry), carry.float())
    blocks = torch.arange(C // bs, device=qi.device)
    base = base.masked_fill(blocks > t // bs, 0.0)
    rows = ((t % bs) // S + 1) * G
    mass = (base + own) / rows
    new_carry = torch.where(t % S == S - 1, base + own, base)
    return mass, new_carry


def select_from_decode_mass(mass, pos, *, block_size, top_p=0.9, top_k=None, sink_blocks=1, local_blocks=2):
    """mass float32 [B, H, NKB] of the query block qb = pos // block_size -> chosen bool [B, H, NKB]: the rule
    of `indexer_block_select` (`indexer_select.select.choose_blocks`: sink and local blocks forced, top-p /
    top-k over the other causal blocks); never kb > qb."""
    return choose_blocks(mass, (pos.long() // block_size).view(-1, 1), top_p=top_p, top_k=top_k,
                         sink_blocks=sink_blocks, local_blocks=local_blocks)


def decode_block_select_reference(qi, ikeys, pos, carry, *, block_size, top_p=0.9, top_k=None, sink_blocks=1,
                                  local_blocks=2, scale=None, query_stride=1):
    """-> (chosen bool [B, H, NKB], new_carry float32 [B, H, NKB]); see the two functions above."""
    mass, new_carry = decode_block_mass_reference(qi, ikeys, pos, carry, block_size=block_size, scale=scale,
                                                  query_stride=query_stride)
    chosen = select_from_decode_mass(mass, pos, block_size=block_size, top_p=top_p, top_k=top_k,
                                     sink_blocks=sink_blocks, local_blocks=local_blocks)
    return chosen, new_carry


def decode_attention_reference(q, k, v, lengths, block_mask=None, *, block_size=64, scale=None):
    """One query row per (batch, head, group member) over a cache, fixed shape.

    q [B, H, G, D], k/v [B, H, C, D], lengths int [B] (slots 0..lengths-1 hold keys),
    block_mask bool [B, H, ceil(C / block_size)] or None (every block). Key slot n is visible iff
    n < lengths[b] and block_mask[b, h, n // block_size]. Softmax in float32 with `scale`
    (default D^-0.5); a row that sees nothing gives 0. -> [B, H, G, D] in q.dtype."""
    B, H, G, D = q.shape
    C = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    scores = scale * torch.matmul(q.float(), k.float().transpose(-1, -2))  # [B, H, G, C]
    slots = torch.arange(C, device=q.device)
    visible = (slots < lengths.long().view(B, 1, 1)).expand(B, H, C)
    if block_mask is not None:
        visible = visible & block_mask.bool().repeat_interleave(block_size, dim=-1)[..., :C]
    scores = scores.masked_fill(~visible[:, :, None], float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    probs = torch.exp(scores - row_max)
    denom = probs.sum(dim=-1, keepdim=True)
    probs = probs / torch.where(denom > 0, denom, torch.ones_like(denom))
    # Zero the invisible values: a preallocated cache may hold garbage (even NaN) past the length, and
    # 0 * NaN would leak into the row.
    values = v.float().masked_fill(~visible[..., None], 0.0)
    return torch.matmul(probs, values).to(q.dtype)
