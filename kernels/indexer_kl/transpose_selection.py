"""Selection lists seen from the key side, for the dki backward of the sparse KL."""
import torch

from ..layout import block_index_from_mask, mask_from_block_index, sync_free_width


def query_blocks_per_key_block(block_idx, block_cnt, num_blocks):
    """(block_idx [B, Hkv, NQB, MAXB], block_cnt [B, Hkv, NQB]) -> (qidx int32 [B, Hkv, NKB, MAXQ],
    qcnt int32 [B, Hkv, NKB]): for each key block, the query blocks qb >= kb that selected it,
    ascending, -1 padded (the same layout as block_idx, transposed)."""
    mask = mask_from_block_index(block_idx, block_cnt, num_blocks)  # [B, Hkv, qb, kb]
    causal = torch.ones(num_blocks, num_blocks, dtype=torch.bool, device=mask.device).tril()
    return block_index_from_mask((mask & causal).transpose(-1, -2), width=sync_free_width(num_blocks))
