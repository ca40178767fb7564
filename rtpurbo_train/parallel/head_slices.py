"""A layer's sparsity constants cut down to the heads one SP rank holds after Ulysses' all-to-all.

After the all-to-all SP rank r holds query heads [r*Hq/sp, (r+1)*Hq/sp) and KV heads
[r*Hkv/sp, (r+1)*Hkv/sp) (slot numbers). When sp > Hkv Ulysses replicates each KV head sp/Hkv times
and rank r holds KV head r // (sp/Hkv) with the matching part of its query group. Head numbers in the
local constants are relative to the rank's slice; the indexer rows say which rows of the layer's
indexer weights (`wq [Hq_r, d, D]`, `wk [Hkv_r, d, D]`, rows in ascending slot order) the rank uses.
"""
from __future__ import annotations

import torch

from ..attention.runtime import LayerSparsity


def local_head_ranges(num_q: int, num_kv: int, sp_rank: int, sp_size: int) -> tuple[range, range]:
    """(query heads, KV heads) that SP rank `sp_rank` holds, as slot ranges."""
    q_per = num_q // sp_size
    q = range(sp_rank * q_per, (sp_rank + 1) * q_per)
    if num_kv % sp_size == 0:
        kv_per = num_kv // sp_size
        return q, range(sp_rank * kv_per, (sp_rank + 1) * kv_per)
    replication = sp_size // num_kv
    head = sp_rank // replication
    return q, range(head, head + 1)


def localize_layer(layer: LayerSparsity, num_q: int, num_kv: int, sp_rank: int, sp_size: int) -> LayerSparsity:
    """The LayerSparsity of one SP rank, with `indexer_q_rows`/`indexer_k_rows` and `kl_share` (the
    rank's fraction of the layer's retrieval query heads: the indexer KL is a mean over those heads,
    so each rank's mean is weighted by it and the SP group's shares add up to the whole layer's KL)."""
    q_range, kv_range = local_head_ranges(num_q, num_kv, sp_rank, sp_size)
    ret_kv = layer.retrieval_kv.tolist()  # ascending slots; indexer wk row r <-> ret_kv[r]
    ret_q = layer.retrieval_q.tolist()  # ascending slots; indexer wq row r <-> ret_q[r]
    k_rows = [r for r, h in enumerate(ret_kv) if h in kv_range]
    q_rows = [r for r, h in enumerate(ret_q) if h in q_range]
    long = dict(dtype=torch.long)
    return LayerSparsity(
        layer_idx=layer.layer_idx,
        retrieval_kv=torch.tensor([ret_kv[r] - kv_range.start for r in k_rows], **long),
        retrieval_q=torch.tensor([ret_q[r] - q_range.start for r in q_rows], **long),
        streaming_kv=torch.tensor([h - kv_range.start for h in layer.streaming_kv.tolist() if h in kv_range], **long),
        kv_window=layer.kv_window[kv_range.start:kv_range.stop].clone(),
        indexer_q_rows=torch.tensor(q_rows, **long),
        indexer_k_rows=torch.tensor(k_rows, **long),
        kl_share=len(q_rows) / len(ret_q) if ret_q else 0.0,
        has_indexer=bool(ret_kv),
    )
