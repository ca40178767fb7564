"""Top-p / top-k block selection from block masses in torch: `choose_blocks`, the rule itself (the reference
backend, the decode reference, and rows longer than the Triton selection of select_triton.py takes), and
`select_blocks_from_mass`, the rule for every query block in the index layout.
"""
import torch

from ..layout import block_index_from_mask, mask_from_block_index, sync_free_width  # noqa: F401 (re-exported)


def choose_blocks(mass, q_blocks, *, top_p=0.9, top_k=None, sink_blocks=1, local_blocks=2):
    """The selection rule. mass float32 [..., NKB] of the query blocks `q_blocks` (absolute indices; any
    shape that broadcasts to mass.shape[:-1], e.g. arange(NQB) for a sequence's [B, H, NQB, NKB] or [B, 1]
    for one decode step per row of [B, H, NKB]; entries kb > qb are ignored) -> chosen bool [..., NKB].

    forced     = the sink blocks kb < sink_blocks and the local blocks kb > qb - local_blocks (the window of
                 a retrieval head), clipped to [0, qb];
    candidates = the other causal blocks kb <= qb;
    top-p keeps the smallest prefix of the candidates sorted by mass (descending; equal masses by lower
    index) whose mass reaches top_p of the candidates' total mass (the mass is renormalised over the blocks
    outside the forced set: a candidate is kept iff the candidate mass ranked before it is < top_p * total,
    so at least one); top_k keeps the min(top_k, #candidates) heaviest candidates; top_p >= 1 keeps every
    causal block. chosen = forced U kept.
    """
    nkb = mass.shape[-1]
    kb = torch.arange(nkb, device=mass.device)
    qb = q_blocks[..., None]
    causal = kb <= qb
    if top_k is None and top_p >= 1.0:
        return causal.expand(mass.shape)
    forced = causal & ((kb < sink_blocks) | (kb > qb - local_blocks))
    candidate = causal & ~forced
    # Stable sort: equal masses rank by block index, so every backend breaks ties the same way.
    vals, order = torch.sort(torch.where(candidate, mass.float(), float("-inf")), dim=-1, descending=True,
                             stable=True)
    in_candidates = kb < candidate.sum(dim=-1, keepdim=True)  # sorted position r holds a candidate
    if top_k is not None:
        keep = in_candidates & (kb < top_k)
    else:
        vals = torch.where(in_candidates, vals, 0.0)
        mass_before = torch.cumsum(vals, dim=-1) - vals
        keep = in_candidates & ((mass_before < top_p * vals.sum(dim=-1, keepdim=True)) | (kb == 0))
    kept = torch.zeros(mass.shape, dtype=torch.bool, device=mass.device).scatter_(-1, order, keep.expand(mass.shape))
    return kept | forced


def select_blocks_from_mass(mass, *, top_p=0.9, top_k=None, sink_blocks=1, local_blocks=2):
    """mass float32 [B, H, NQB, NQB] (entries kb > qb are ignored, whatever they hold) ->
    (block_idx int32 [B, H, NQB, MAXB] sorted ascending, -1 padded; block_cnt int32 [B, H, NQB]):
    `choose_blocks` for every query block qb.
    """
    nqb = mass.shape[-1]
    selected = choose_blocks(mass, torch.arange(nqb, device=mass.device), top_p=top_p, top_k=top_k,
                             sink_blocks=sink_blocks, local_blocks=local_blocks)
    return block_index_from_mask(selected, width=selection_width(nqb, top_k, sink_blocks, local_blocks))


def selection_width(nqb, top_k, sink_blocks, local_blocks):
    """MAXB known without reading the data (no device sync): top-k bounds the count, else the causal range
    (None past layout.MAX_STATIC_WIDTH blocks: the exact width, one sync)."""
    return min(nqb, int(top_k) + sink_blocks + local_blocks) if top_k is not None else sync_free_width(nqb)
