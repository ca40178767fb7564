"""Sparse attention for HF decoders: the `rtpurbo` attention function, indexer, runtime state."""
from .dispatch import ATTENTION_NAME, attach_sparsity, attention_modules, indexer_parameters, rtpurbo_attention
from .indexer import Indexer
from .runtime import MODES, SparseRuntime

__all__ = ["ATTENTION_NAME", "MODES", "Indexer", "SparseRuntime", "attach_sparsity", "attention_modules",
           "indexer_parameters", "rtpurbo_attention"]
