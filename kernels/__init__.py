"""RTPurbo kernels (import name `rtpurbo_kernels`): each op is a folder with `naive.py` (the PyTorch
reference), the Triton implementation and a README with the math and the index layout.
The contracts are in docs/INTERFACES.md."""
import importlib

_ENTRY_POINTS = {
    "block_sparse_attention": "block_sparse_attn",
    "streaming_block_index": "block_sparse_attn",
    "merge_head_blocks": "block_sparse_attn",
    "indexer_block_select": "indexer_select",
    "indexer_kl_loss": "indexer_kl",
    "decode_block_select": "sparse_decode",
    "decode_attention": "sparse_decode",
}
__all__ = list(_ENTRY_POINTS)


def __getattr__(name):
    # Lazy, so importing one op (or the reference path on a machine without triton) loads only that op.
    if name in _ENTRY_POINTS:
        return getattr(importlib.import_module(f".{_ENTRY_POINTS[name]}", __name__), name)
    raise AttributeError(name)
