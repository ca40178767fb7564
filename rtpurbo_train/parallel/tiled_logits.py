"""LM and distillation losses (and the teacher's top-k) without materialising [T, V] logits.

At 100K+ tokens the logits alone are T * V floats (100K x 152K x 4 B = 61 GB for a Qwen2 vocabulary).
The model is run up to its final hidden states (`final_hidden_states`), then the output head is applied
tile by tile. Each tile's loss runs under non-reentrant activation checkpointing: the forward keeps
only the tile's inputs, and the backward recomputes one tile's logits at a time. Gradients reach the
head weight through ordinary autograd (one accumulation, tied embeddings included), so any loss weight,
gradient-accumulation scale or ZeRO stage applies unchanged. Peak extra memory: one tile's logits.
(DeepSpeed's TiledFusedLogitsLoss runs the backward inside the forward with a unit upstream gradient,
so a weighted or accumulated loss would scale the hidden-state gradient but not the head's.)

Exact for heads that compute `logits = lm_head(h)` (Llama, Qwen2/3, Mistral); models with logit
soft-capping or scaling after the head would need it in `_tile_losses`.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..losses import teacher_topk, topk_distillation_loss

IGNORE_INDEX = -100
TILE_ELEMENTS = 1 << 26  # logits per tile (B * tile_tokens * V): 256 MB in float32


def tile_tokens(batch: int, vocab: int, elements: int = TILE_ELEMENTS) -> int:
    return max(1, elements // max(batch * vocab, 1))


def final_hidden_states(model, forward) -> torch.Tensor:
    """Run `forward()` (a call of `model` or of the engine wrapping it) but stop the output head from
    computing logits: a pre-hook keeps its input, the final hidden states [B, T, H], and hands the head
    an empty slice instead. Returns those hidden states (with their graph)."""
    head = model.get_output_embeddings()
    box: dict[str, torch.Tensor] = {}

    def keep_input(module, args):
        box["hidden"] = args[0]
        return (args[0][:, :0],)

    handle = head.register_forward_pre_hook(keep_input)
    try:
        forward()
    finally:
        handle.remove()
    if "hidden" not in box:
        raise RuntimeError(f"{type(model).__name__}: the output head was not called during the forward")
    return box["hidden"]


def _tile_losses(head, hidden, targets, teacher_logp, teacher_ids):
    """One tile: (sum of CE over valid targets, sum of top-k distillation KL over valid targets)."""
    logits = head(hidden).float()
    flat = logits.flatten(0, 1)
    ce = F.cross_entropy(flat, targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    if teacher_logp is None:
        return ce, ce.new_zeros(())
    valid = targets != IGNORE_INDEX
    return ce, topk_distillation_loss(logits, teacher_logp, teacher_ids, valid) * valid.sum()


def tiled_token_losses(head, hidden: torch.Tensor, targets: torch.Tensor, teacher_logp: torch.Tensor | None = None,
                       teacher_ids: torch.Tensor | None = None, *, tile: int | None = None):
    """hidden [B, T, H]; targets [B, T] (next-token ids aligned with the positions, -100 = none);
    teacher_logp/ids [B, T, k] or None. Returns (CE sum, KL sum) as float32 scalars: sums over the valid
    targets, to be divided by the valid count of the whole sequence (`loss_shares`).

    KL is `sum_{v in teacher top-k} p_t(v) (log p_t(v) - log p_s(v))` (losses/distill.py)."""
    B, T, _ = hidden.shape
    tile = tile or tile_tokens(B, head.weight.shape[0])
    ce_total = hidden.new_zeros((), dtype=torch.float32)
    kl_total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, T, tile):
        sl = slice(start, start + tile)
        args = (head, hidden[:, sl], targets[:, sl],
                None if teacher_logp is None else teacher_logp[:, sl], None if teacher_ids is None else teacher_ids[:, sl])
        if torch.is_grad_enabled() and hidden.requires_grad:
            ce, kl = checkpoint(_tile_losses, *args, use_reentrant=False)
        else:
            ce, kl = _tile_losses(*args)
        ce_total = ce_total + ce
        kl_total = kl_total + kl
    return ce_total, kl_total


@torch.no_grad()
def tiled_teacher_topk(head, hidden: torch.Tensor, k: int, *, tile: int | None = None):
    """hidden [B, T, H] -> (log-probs renormalised over the top k [B, T, k] float32, ids [B, T, k]),
    as `losses.teacher_topk` of the full logits, one tile of positions at a time."""
    B, T, _ = hidden.shape
    tile = tile or tile_tokens(B, head.weight.shape[0])
    logps, ids = [], []
    for start in range(0, T, tile):
        logp, idx = teacher_topk(head(hidden[:, start:start + tile]), k)
        logps.append(logp)
        ids.append(idx)
    return torch.cat(logps, dim=1), torch.cat(ids, dim=1)


__all__ = ["final_hidden_states", "tile_tokens", "tiled_teacher_topk", "tiled_token_losses"]
