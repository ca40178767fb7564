"""PyTorch reference for the indexer block masses (the CPU backend and the tests' reference).

Memory-bounded: the [rows, keys] score matrix is built for a chunk of query blocks at a time, never
T x T for all heads at once.
"""
import math

import torch

from .select import select_blocks_from_mass

# Bytes of float32 scores one chunk may hold (per chunk: B * Hq * rows * keys * 4).
CHUNK_BYTES = 256 * 2**20


def rows_per_chunk(batch_heads: int, num_keys: int, block_size: int) -> int:
    """Query rows per chunk: a multiple of `block_size`, at least one block (CHUNK_BYTES read at call
    time, so tests can shrink it to force many chunks)."""
    rows = CHUNK_BYTES // max(1, batch_heads * num_keys * 4)
    return max(block_size, rows // block_size * block_size)


def sampled_rows(start: int, end: int, T: int, block_size: int, query_stride: int) -> list[int]:
    """The query rows in [start, end) whose indexer mass a block's selection averages (README.md,
    "Query stride"): in each query block, the rows m with m % S == S - 1, plus the block's last row
    m < T. S = 1: all. Computed from the shape alone (no device read)."""
    return [m for m in range(start, end)
            if m % query_stride == query_stride - 1 or m % block_size == block_size - 1 or m == T - 1]


def block_mass_reference(qi, ki, *, block_size=64, scale=None, query_stride=1):
    """Block attention mass of the indexer, averaged over each query block's sampled rows and KV group.

    qi [B, T, Hq, d], ki [B, T, Hkv, d] -> mass float32 [B, Hkv, NQB, NQB] where
    mass[b, h, qb, kb] = mean over the sampled queries m of block qb (`sampled_rows`; every valid query
    when query_stride = 1) and the G query heads of group h of
    sum_{n in block kb, n <= m} softmax_{n <= m}(scale * qi_m . ki_n). Entries with kb > qb are 0.
    """
    B, T, Hq, d = qi.shape
    Hkv = ki.shape[2]
    G = Hq // Hkv
    bs = block_size
    nqb = math.ceil(T / bs)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q = qi.float().transpose(1, 2)  # [B, Hq, T, d]
    # Each query head reads its group's key head (query heads of a group are contiguous).
    k = ki.float().transpose(1, 2).repeat_interleave(G, dim=1)  # [B, Hq, T, d]
    mass = torch.zeros(B, Hkv, nqb, nqb, dtype=torch.float32, device=qi.device)
    step = rows_per_chunk(B * Hq, T, bs) * query_stride  # only 1/S of a chunk's rows are scored
    for r0 in range(0, T, step):
        r1 = min(T, r0 + step)
        rows_list = sampled_rows(r0, r1, T, bs, query_stride)
        rows = torch.tensor(rows_list, device=qi.device)
        n_keys = r1  # causal: rows < r1 never look past key r1 - 1
        s = scale * torch.matmul(q[:, :, rows], k[:, :, :n_keys].transpose(-1, -2))  # [B, Hq, R, N]
        cols = torch.arange(n_keys, device=qi.device)
        s = s.masked_fill(cols[None, :] > rows[:, None], float("-inf"))
        p = torch.softmax(s, dim=-1)
        nkb = math.ceil(n_keys / bs)
        p = torch.nn.functional.pad(p, (0, nkb * bs - n_keys))
        p = p.view(B, Hkv, G, len(rows), nkb, bs).sum(dim=(2, 5))  # [B, Hkv, R, nkb]: keys per block, heads
        blocks = rows // bs
        sums = torch.zeros(B, Hkv, nqb, nkb, dtype=torch.float32, device=qi.device).index_add_(2, blocks, p)
        counts = torch.zeros(nqb, device=qi.device).index_add_(0, blocks, torch.ones(len(rows), device=qi.device))
        touched = slice(r0 // bs, (r1 - 1) // bs + 1)  # the chunk starts on a block boundary
        mass[:, :, touched, :nkb] = sums[:, :, touched] / (G * counts[touched])[:, None]
    return mass


def indexer_block_select_reference(qi, ki, *, top_p=0.9, top_k=None, block_size=64, sink_blocks=1,
                                   local_blocks=2, scale=None, query_stride=1):
    """Reference `indexer_block_select`: block masses in PyTorch, then the shared selection step.

    Returns (block_idx int32 [B, Hkv, NQB, MAXB] -1 padded, block_cnt int32 [B, Hkv, NQB]).
    """
    with torch.no_grad():
        mass = block_mass_reference(qi, ki, block_size=block_size, scale=scale, query_stride=query_stride)
        return select_blocks_from_mass(mass, top_p=top_p, top_k=top_k, sink_blocks=sink_blocks,
                                       local_blocks=local_blocks)
