"""Reverse block map for the dK/dV backward: for each key block, the query blocks that selected it.

Layout (CSR over the flattened (b, kv head, key block) rows, built on the device with torch ops):
    rev_ptr   int32 [B * Hkv * NKB + 1]   row r = (b * Hkv + h) * NKB + kb owns entries
                                          rev_ptr[r] .. rev_ptr[r + 1] - 1
    rev_qblk  int32 [B*Hkv*NQB*MAXB]      the query blocks qb (ascending within a row) whose
                                          selection block_idx[b, h, qb, :block_cnt[b, h, qb]] holds kb
                                          (entries past rev_ptr[-1] are padding, never read)
Equivalent PyTorch (slow, for reading only):
    for b, h, kb: rev[b][h][kb] = [qb for qb in range(NQB) if kb in block_idx[b, h, qb, :block_cnt[b, h, qb]]]
"""
from __future__ import annotations

import torch


def build_reverse_block_map(block_idx: torch.Tensor, block_cnt: torch.Tensor, num_kv_blocks: int):
    """block_idx int32 [B, Hkv, NQB, MAXB] (-1 padded), block_cnt int32 [B, Hkv, NQB]
    -> (rev_ptr int32 [B*Hkv*NKB + 1], rev_qblk int32 [B*Hkv*NQB*MAXB]; entries past rev_ptr[-1] unused).

    Fixed shapes only (no boolean compaction, no bincount): the backward queues it without waiting
    for the GPU. Padding entries go to a sentinel row past the last one, so they sort to the end."""
    batch, num_kv_heads, num_q_blocks, maxb = block_idx.shape
    device = block_idx.device
    if block_idx.numel() >= 2**31:
        raise ValueError(f"{block_idx.numel()} block entries overflow the int32 reverse map")
    num_rows = batch * num_kv_heads * num_kv_blocks
    valid = torch.arange(maxb, device=device) < block_cnt[..., None]                     # [B,Hkv,NQB,MAXB]
    pair = torch.arange(batch * num_kv_heads, device=device).view(batch, num_kv_heads, 1, 1)
    row = torch.where(valid, pair * num_kv_blocks + block_idx.long(), num_rows).reshape(-1)  # CSR row
    q_block = torch.arange(num_q_blocks, device=device, dtype=torch.int32).view(1, 1, num_q_blocks, 1)
    q_of_entry = q_block.expand_as(block_idx).reshape(-1)
    # Entries are enumerated in (pair, qb) order; a stable sort by row keeps qb ascending within a row.
    row_sorted, order = torch.sort(row, stable=True)
    rev_qblk = q_of_entry[order]
    # rev_ptr[r] = number of entries in rows < r
    rev_ptr = torch.searchsorted(row_sorted, torch.arange(num_rows + 1, device=device))
    if rev_qblk.numel() == 0:          # keep a valid pointer for the kernel even when MAXB = 0
        rev_qblk = torch.zeros(1, dtype=torch.int32, device=device)
    return rev_ptr.to(torch.int32), rev_qblk.to(torch.int32).contiguous()
