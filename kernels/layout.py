"""The block index layout shared by every op (docs/INTERFACES.md): `block_idx` int32 [..., NQB, MAXB]
sorted ascending, -1 padded, with `block_cnt` int32 [..., NQB]; and its dense-mask equivalent.
Torch ops on the inputs' device."""
from __future__ import annotations

import torch


# Up to this many blocks (256K tokens at block 64) an index as wide as the mask (at most 64 MiB per head,
# the size of the selection's mass tensor) saves the device sync that finding the widest row takes;
# longer inputs are sized exactly.
MAX_STATIC_WIDTH = 4096


def sync_free_width(num_blocks: int) -> int | None:
    """A `width` for block_index_from_mask that needs no device sync: the mask's width when it is small
    enough, else None (exact width)."""
    return num_blocks if num_blocks <= MAX_STATIC_WIDTH else None


def block_index_from_mask(block_mask: torch.Tensor, min_width: int = 1, width: int | None = None):
    """bool [..., NKB] -> (block_idx int32 [..., MAXB], block_cnt int32 [...]).

    MAXB = max(min_width, largest count), which reads the counts back to the host (a device sync);
    or `width`, an upper bound of every count the caller knows (no sync). Selected blocks come out
    ascending, padding is -1.
    """
    num_kv_blocks = block_mask.shape[-1]
    cnt = block_mask.sum(dim=-1)
    if width is None:
        width = max(min_width, int(cnt.max()) if cnt.numel() else 0)
    else:
        width = max(min_width, min(width, num_kv_blocks))
    ids = torch.arange(num_kv_blocks, device=block_mask.device).expand_as(block_mask)
    # Unselected blocks sort after every selected one, then become -1.
    keyed = torch.where(block_mask, ids, num_kv_blocks)
    ordered = keyed.sort(dim=-1).values[..., :width]
    if ordered.shape[-1] < width:
        pad = torch.full((*ordered.shape[:-1], width - ordered.shape[-1]), num_kv_blocks, device=block_mask.device)
        ordered = torch.cat([ordered, pad], dim=-1)
    block_idx = torch.where(ordered == num_kv_blocks, -1, ordered).to(torch.int32)
    return block_idx.contiguous(), cnt.to(torch.int32)


def mask_from_block_index(block_idx: torch.Tensor, block_cnt: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """(block_idx [..., MAXB], block_cnt [...]) -> bool mask [..., num_blocks]; the inverse of
    `block_index_from_mask`. Entries at or past the count (or -1) are ignored."""
    maxb = block_idx.shape[-1]
    valid = torch.arange(maxb, device=block_idx.device) < block_cnt[..., None].long()
    valid = valid & (block_idx >= 0) & (block_idx < num_blocks)
    target = torch.where(valid, block_idx.long(), num_blocks)  # dump slot for padding
    mask = torch.zeros(*block_idx.shape[:-1], num_blocks + 1, dtype=torch.bool, device=block_idx.device)
    mask.scatter_(-1, target, True)
    return mask[..., :num_blocks]
