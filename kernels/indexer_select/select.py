"""Top-p / top-k block selection from block masses (torch ops, shared by both backends).

The heavy part (the masses) comes from `naive.block_mass_reference` or the Triton kernel; this step
works on the small [B, Hkv, NQB, NQB] mass tensor with sort + cumsum, on the tensor's device.
"""
import torch


def select_blocks_from_mass(mass, *, top_p=0.9, top_k=None, sink_blocks=1, local_blocks=2):
    """mass float32 [B, H, NQB, NQB] (entries kb > qb are ignored, whatever they hold) ->
    (block_idx int32 [B, H, NQB, MAXB] sorted ascending, -1 padded; block_cnt int32 [B, H, NQB]).

    chosen = smallest prefix of the causal blocks sorted by mass (descending) whose mass sum >= top_p
    (top_k mode: the min(top_k, qb + 1) heaviest; top_p >= 1 keeps every causal block), then the
    sink blocks and the `local_blocks` blocks ending at qb are added, all clipped to [0, qb].
    """
    nqb = mass.shape[-1]
    dev = mass.device
    qb = torch.arange(nqb, device=dev)[:, None]
    kb = torch.arange(nqb, device=dev)[None, :]
    causal = kb <= qb  # [NQB, NQB]
    if top_k is None and top_p >= 1.0:
        chosen = causal.expand(mass.shape)
    else:
        ranked = torch.where(causal, mass.float(), float("-inf"))
        # Stable sort: equal masses rank by block index, so both backends break ties the same way.
        vals, order = torch.sort(ranked, dim=-1, descending=True, stable=True)
        rank = torch.arange(nqb, device=dev)
        in_causal = rank[None, :] <= qb  # sorted position j holds a causal block iff j <= qb
        if top_k is not None:
            keep = in_causal & (rank[None, :] < top_k)
        else:
            vals = torch.where(in_causal, vals, 0.0)
            mass_before = torch.cumsum(vals, dim=-1) - vals
            # A block is in the minimal prefix iff the mass before it is still short of top_p.
            keep = in_causal & (mass_before < top_p)
            keep[..., 0] = True
        keep = keep.expand(mass.shape)
        chosen = torch.zeros(mass.shape, dtype=torch.bool, device=dev).scatter_(-1, order, keep)
    forced = (kb < sink_blocks) | (kb > qb - local_blocks)
    selected = (chosen | forced) & causal
    return block_index_from_mask(selected)


def block_index_from_mask(mask):
    """mask bool [..., N] -> (idx int32 [..., MAXB] ascending, -1 padded; cnt int32 [...]);
    MAXB = max count (at least 1)."""
    n = mask.shape[-1]
    cnt = mask.sum(-1)
    maxb = max(1, int(cnt.max().item())) if cnt.numel() else 1
    pos = torch.arange(n, device=mask.device, dtype=torch.int32)
    # Unselected positions sort after every selected one (key n), then get the -1 padding.
    keyed = torch.where(mask, pos, n)
    idx = torch.sort(keyed, dim=-1).values[..., :maxb]
    idx = torch.where(idx == n, -1, idx).to(torch.int32)
    return idx.contiguous(), cnt.to(torch.int32)


def mask_from_block_index(block_idx, block_cnt, num_blocks):
    """(block_idx [..., MAXB], block_cnt [...]) -> bool mask [..., num_blocks]; inverse of
    `block_index_from_mask`. Entries at or past the count (or -1) are ignored."""
    maxb = block_idx.shape[-1]
    valid = torch.arange(maxb, device=block_idx.device) < block_cnt[..., None].long()
    valid = valid & (block_idx >= 0) & (block_idx < num_blocks)
    target = torch.where(valid, block_idx.long(), num_blocks)  # dump slot for padding
    mask = torch.zeros(*block_idx.shape[:-1], num_blocks + 1, dtype=torch.bool, device=block_idx.device)
    mask.scatter_(-1, target, True)
    return mask[..., :num_blocks]
