"""Block index lists in the layout of docs/INTERFACES.md (int32, sorted ascending, -1 padded).

The layer's index is built by the kernels package's layout helpers, shared with the exported model's
kernel prefill: streaming rows (sink + window, `streaming_blocks`) merged with the retrieval heads'
selection (`merge_head_blocks`)."""
from rtpurbo_kernels.block_sparse_attn.layout import merge_head_blocks, streaming_block_index

__all__ = ["streaming_blocks", "merge_head_blocks", "causal_block_count"]


def streaming_blocks(seq_len: int, block_size: int, window: int, sink_tokens: int, device=None):
    """Blocks a sink+window head needs: the sink blocks and the blocks the window of any query of the
    query block touches. Returns (idx [NQB, MAXB], cnt [NQB]); the window edge is cut token-exactly
    by the kernel (`kv_window`). Cached (callers must not modify the lists)."""
    return streaming_block_index(seq_len, window, sink_tokens, block_size, device)


def causal_block_count(seq_len: int, block_size: int) -> int:
    nqb = -(-seq_len // block_size)
    return nqb * (nqb + 1) // 2
