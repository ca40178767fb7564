"""Block index lists in the layout of docs/INTERFACES.md (int32, sorted ascending, -1 padded)."""
import functools

import torch


def _pack_sorted(cand: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cand [..., M] int64 candidate blocks (-1 = none, duplicates allowed) -> (idx int32, cnt int32)."""
    big = torch.iinfo(torch.int64).max
    keyed = torch.where(cand < 0, torch.full_like(cand, big), cand)
    keyed, _ = keyed.sort(dim=-1)
    dup = torch.zeros_like(keyed, dtype=torch.bool)
    dup[..., 1:] = keyed[..., 1:] == keyed[..., :-1]
    keyed = torch.where(dup, torch.full_like(keyed, big), keyed)
    keyed, _ = keyed.sort(dim=-1)
    valid = keyed != big
    cnt = valid.sum(-1)
    width = max(int(cnt.max()), 1) if cnt.numel() else 1
    idx = torch.where(valid, keyed, torch.full_like(keyed, -1))[..., :width]
    return idx.to(torch.int32).contiguous(), cnt.to(torch.int32)


@functools.lru_cache(maxsize=16)
def streaming_blocks(seq_len: int, block_size: int, window: int, sink_tokens: int, device=None):
    """Blocks a sink+window head needs: the sink blocks and the blocks the window of any query of the
    query block touches. Returns (idx [NQB, MAXB], cnt [NQB]); the window edge is cut token-exactly
    by the kernel (`kv_window`). Cached: every layer of a forward asks for the same lists (callers
    must not modify them)."""
    nqb = -(-seq_len // block_size)
    qb = torch.arange(nqb, device=device)
    n_sink = -(-sink_tokens // block_size)
    first = ((qb * block_size - window + 1).clamp(min=0)) // block_size
    span = (window + block_size - 2) // block_size + 1
    win = first[:, None] + torch.arange(span + 1, device=device)[None, :]
    win = torch.where(win <= qb[:, None], win, torch.full_like(win, -1))
    sink = torch.arange(n_sink, device=device)[None, :].expand(nqb, n_sink)
    sink = torch.where(sink <= qb[:, None], sink, torch.full_like(sink, -1))
    return _pack_sorted(torch.cat([sink, win], dim=1))


def merge_head_blocks(stream: tuple[torch.Tensor, torch.Tensor], retrieval: tuple[torch.Tensor, torch.Tensor] | None,
                      retrieval_heads: torch.Tensor, batch: int, num_kv_heads: int):
    """One (idx [B, Hkv, NQB, MAXB], cnt [B, Hkv, NQB]) for a layer: streaming rows for every KV head,
    then retrieval rows (idx [B, Hkv_r, NQB, M]) written over the retrieval heads."""
    s_idx, s_cnt = stream
    width = s_idx.shape[-1] if retrieval is None else max(s_idx.shape[-1], retrieval[0].shape[-1])
    nqb = s_idx.shape[0]
    idx = torch.full((batch, num_kv_heads, nqb, width), -1, dtype=torch.int32, device=s_idx.device)
    idx[..., : s_idx.shape[-1]] = s_idx
    cnt = s_cnt.expand(batch, num_kv_heads, nqb).clone()
    if retrieval is not None and retrieval_heads.numel():
        r_idx, r_cnt = retrieval
        idx[:, retrieval_heads] = -1
        idx[:, retrieval_heads, :, : r_idx.shape[-1]] = r_idx
        cnt[:, retrieval_heads] = r_cnt
    return idx.contiguous(), cnt.contiguous()


def causal_block_count(seq_len: int, block_size: int) -> int:
    nqb = -(-seq_len // block_size)
    return nqb * (nqb + 1) // 2
