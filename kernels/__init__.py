"""RTPurbo kernels (import name `rtpurbo_kernels`): each op is a folder with `naive.py` (the PyTorch
reference), the Triton implementation and a README with the math and the index layout.
The contracts are in docs/INTERFACES.md."""
from .block_sparse_attn import block_sparse_attention
from .indexer_kl import indexer_kl_loss
from .indexer_select import indexer_block_select

__all__ = ["block_sparse_attention", "indexer_block_select", "indexer_kl_loss"]
