"""Block counts in the layout of docs/INTERFACES.md. The layer's block index itself is built by the
kernels package's layout helpers (`streaming_block_index`, `merge_head_blocks` in
rtpurbo_kernels.block_sparse_attn.layout), shared with the exported model's kernel prefill."""


def causal_block_count(seq_len: int, block_size: int) -> int:
    nqb = -(-seq_len // block_size)
    return nqb * (nqb + 1) // 2
