"""Sequence parallelism for long contexts: DeepSpeed Ulysses wiring, retrieval-head balancing across
SP ranks, SP-aware loss shares, and the tiled logits/loss path.

Where things live:
- `validate.py`      checks a recipe + model config against an SP size before any weight is loaded
- `head_balance.py`  the KV-head permutation that gives every SP rank the same number of retrieval heads
- `head_slices.py`   a layer's sparsity constants cut down to the heads one rank holds after the all-to-all
- `ulysses.py`       `enable_sequence_parallel` (UlyssesSPAttentionHF around the `rtpurbo` attention)
- `sp_loader.py`     the resumable UlyssesSPDataLoaderAdapter around our loader
- `loss_shares.py`   valid-token counts over the SP group; metric reduction across ranks
- `tiled_logits.py`  LM / distillation losses and teacher top-k without materialising [T, V] logits
"""
from .head_balance import apply_kv_head_permutation, balanced_kv_head_permutation
from .tiled_logits import final_hidden_states, tiled_teacher_topk, tiled_token_losses
from .validate import validate_sequence_parallel

__all__ = ["apply_kv_head_permutation", "balanced_kv_head_permutation", "final_hidden_states",
           "tiled_teacher_topk", "tiled_token_losses", "validate_sequence_parallel"]
