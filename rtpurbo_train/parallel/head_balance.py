"""Spread retrieval KV heads evenly over the sequence-parallel ranks.

Ulysses gives SP rank r the contiguous KV slots [r * Hkv/sp, (r+1) * Hkv/sp) of every layer. Retrieval
heads run the indexer, top-p selection and the indexer KL, streaming heads only sink + window, so a rank
holding most retrieval heads does most of the work (and most of the memory). Permuting KV heads - the
rows of q/k/v, the columns of o_proj and the indexer rows, with each KV head's query group moving along
- is an exact reparametrisation: the model computes the same function.

Convention (`SparsityPlan.kv_head_permutation`, shared with export): `perm[i][s]` is the ORIGINAL KV
head stored at slot s of layer i; the plan's retrieval heads stay original numbers. Export undoes the
permutation (`export/head_permutation.py`); applying it reuses that code with the inverse permutation.
"""
from __future__ import annotations

from ..export.head_permutation import undo_kv_head_permutation


def balanced_kv_head_permutation(plan, sp_size: int) -> list[list[int]] | None:
    """Per layer, a permutation putting the same number of retrieval heads on every SP rank (+-1 when
    the count does not divide; the ranks that take the extra one rotate from layer to layer so the
    totals over the model stay even too). None when no layer needs moving, or when the KV heads do not
    split into whole per-rank slices (sp > Hkv: each rank holds one replicated KV head anyway)."""
    kv = plan.model.num_kv_heads
    if sp_size <= 1 or kv % sp_size or kv == sp_size:
        return None
    per_rank = kv // sp_size
    perms, moved, offset = [], False, 0
    for i in range(plan.model.num_layers):
        retrieval = plan.retrieval_kv_heads(i)
        streaming = [h for h in range(kv) if h not in set(retrieval)]
        slots: list[list[int]] = [[] for _ in range(sp_size)]
        for n, head in enumerate(retrieval):  # round-robin, starting where the last layer stopped
            slots[(offset + n) % sp_size].append(head)
        offset = (offset + len(retrieval)) % sp_size
        for rank_slots in slots:
            while len(rank_slots) < per_rank:
                rank_slots.append(streaming.pop(0))
        perm = [h for rank_slots in slots for h in sorted(rank_slots)]
        moved |= perm != list(range(kv))
        perms.append(perm)
    return perms if moved else None


def retrieval_per_rank(plan, perm: list[list[int]] | None, sp_size: int) -> list[list[int]]:
    """[layer][rank] number of retrieval KV heads each SP rank holds under `perm` (None = identity)."""
    kv = plan.model.num_kv_heads
    out = []
    for i in range(plan.model.num_layers):
        slot_of = {h: s for s, h in enumerate(perm[i])} if perm else {h: h for h in range(kv)}
        counts = [0] * sp_size
        for h in plan.retrieval_kv_heads(i):
            counts[min(slot_of[h] * sp_size // kv, sp_size - 1)] += 1
        out.append(counts)
    return out


def inverse(perm: list[list[int]]) -> list[list[int]]:
    out = []
    for p in perm:
        inv = [0] * len(p)
        for slot, head in enumerate(p):
            inv[head] = slot
        out.append(inv)
    return out


def apply_kv_head_permutation(attention_modules, perm: list[list[int]], group: int, head_dim: int) -> None:
    """Permute the q/k/v rows and o_proj columns of a model in ORIGINAL head order (in place), so slot
    s holds original KV head perm[i][s]. Call before `attach_sparsity` (which then builds the indexer
    rows in slot order). Undoing `inverse(perm)` is exactly applying `perm`: the undo writes new head h
    from old slot inverse(inverse(perm))[h] = perm[h]."""
    undo_kv_head_permutation(attention_modules, {}, [[] for _ in attention_modules], inverse(perm), group, head_dim)
