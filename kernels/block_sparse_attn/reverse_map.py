"""Reverse block map for the dK/dV backward: for each key block, the query blocks that selected it.

Layout (CSR over the flattened (b, kv head, key block) rows, built on the device with torch ops):
    rev_ptr   int32 [B * Hkv * NKB + 1]   row r = (b * Hkv + h) * NKB + kb owns entries
                                          rev_ptr[r] .. rev_ptr[r + 1] - 1
    rev_qblk  int32 [max(nnz, 1)]         the query blocks qb (ascending within a row) whose
                                          selection block_idx[b, h, qb, :block_cnt[b, h, qb]] holds kb
Equivalent PyTorch (slow, for reading only):
    for b, h, kb: rev[b][h][kb] = [qb for qb in range(NQB) if kb in block_idx[b, h, qb, :block_cnt[b, h, qb]]]
"""
from __future__ import annotations

import torch


def build_reverse_block_map(block_idx: torch.Tensor, block_cnt: torch.Tensor, num_kv_blocks: int):
    """block_idx int32 [B, Hkv, NQB, MAXB] (-1 padded), block_cnt int32 [B, Hkv, NQB]
    -> (rev_ptr int32 [B*Hkv*NKB + 1], rev_qblk int32 [max(nnz, 1)])."""
    batch, num_kv_heads, num_q_blocks, maxb = block_idx.shape
    device = block_idx.device
    if block_idx.numel() >= 2**31:
        raise ValueError(f"{block_idx.numel()} block entries overflow the int32 reverse map")
    valid = torch.arange(maxb, device=device) < block_cnt[..., None]                     # [B,Hkv,NQB,MAXB]
    pair = torch.arange(batch * num_kv_heads, device=device).view(batch, num_kv_heads, 1, 1)
    q_block = torch.arange(num_q_blocks, device=device, dtype=torch.int32).view(1, 1, num_q_blocks, 1)
    row = pair * num_kv_blocks + block_idx.long()                                         # CSR row of each entry
    row = row[valid]
    q_of_entry = q_block.expand_as(block_idx)[valid]
    # Entries are enumerated in (pair, qb) order; a stable sort by row keeps qb ascending within a row.
    row_sorted, order = torch.sort(row, stable=True)
    rev_qblk = q_of_entry[order]
    counts = torch.bincount(row_sorted, minlength=batch * num_kv_heads * num_kv_blocks)
    rev_ptr = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=device)
    torch.cumsum(counts, dim=0, out=rev_ptr[1:])
    if rev_qblk.numel() == 0:          # keep a valid pointer for the kernel even when nothing is selected
        rev_qblk = torch.zeros(1, dtype=torch.int32, device=device)
    return rev_ptr.to(torch.int32), rev_qblk.to(torch.int32).contiguous()
