"""Top-p / top-k block selection from block masses (torch ops, shared by both backends).

The heavy part (the masses) comes from `naive.block_mass_reference` or the Triton kernel; this step
works on the small [B, Hkv, NQB, NQB] mass tensor with sort + cumsum, on the tensor's device.
"""
import torch

from ..layout import block_index_from_mask, mask_from_block_index, sync_free_width  # noqa: F401 (re-exported)


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
    # MAXB known without reading the data (no device sync): top-k bounds it, else the causal range
    width = min(nqb, int(top_k) + sink_blocks + local_blocks) if top_k is not None else sync_free_width(nqb)
    return block_index_from_mask(selected, width=width)
