"""Block index lists in the layout of docs/INTERFACES.md (int32, sorted ascending, -1 padded)."""
import functools

import torch

from rtpurbo_kernels.block_sparse_attn.layout import streaming_block_mask
from rtpurbo_kernels.layout import block_index_from_mask


@functools.lru_cache(maxsize=16)
def streaming_blocks(seq_len: int, block_size: int, window: int, sink_tokens: int, device=None):
    """Blocks a sink+window head needs: the sink blocks and the blocks the window of any query of the
    query block touches. Returns (idx [NQB, MAXB], cnt [NQB]); the window edge is cut token-exactly
    by the kernel (`kv_window`). Cached: every layer of a forward asks for the same lists (callers
    must not modify them)."""
    mask = streaming_block_mask(seq_len, window, sink_tokens, block_size, device=device)
    return block_index_from_mask(mask)


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
        rows = torch.full((batch, r_idx.shape[1], nqb, width), -1, dtype=torch.int32, device=s_idx.device)
        rows[..., : r_idx.shape[-1]] = r_idx
        # index_copy_, not idx[:, heads] = ...: advanced-index assignment waits for the GPU
        idx.index_copy_(1, retrieval_heads, rows)
        cnt.index_copy_(1, retrieval_heads, r_cnt.to(cnt.dtype))
    return idx, cnt


def causal_block_count(seq_len: int, block_size: int) -> int:
    nqb = -(-seq_len // block_size)
    return nqb * (nqb + 1) // 2
