"""The losses of one micro-batch: teacher pass (no grad), student forward, weighted sum.

Logits are never materialised whole: both models run to their final hidden states and the output
head is applied tile by tile (`parallel/tiled_logits.py`). Under sequence parallelism the batch is
this rank's token shard and every term is this rank's share of the micro-batch loss
(`parallel/loss_shares.py`); the shares of an SP group add up to the SP=1 loss.
"""
from __future__ import annotations

import torch

from ..parallel.loss_shares import group_valid_count, shifted_targets
from ..parallel.tiled_logits import final_hidden_states, tiled_teacher_topk, tiled_token_losses


def model_inputs(batch) -> dict:
    inputs = {"input_ids": batch["input_ids"], "use_cache": False}
    if "position_ids" in batch:  # sequence parallelism: the shard's global positions
        inputs["position_ids"] = batch["position_ids"]
    return inputs


@torch.no_grad()
def teacher_targets(teacher, student, runtime, inputs, k):
    """Top-k log-probs [B, T, k] of the dense teacher at every position. With LoRA the teacher is the
    student with its adapters disabled (no extra memory); otherwise a frozen dense copy of the model."""
    if teacher is None:
        with student.disable_adapter(), runtime.teacher_pass():
            hidden = final_hidden_states(student, lambda: student(**inputs))
        return tiled_teacher_topk(student.get_output_embeddings(), hidden, k)
    hidden = final_hidden_states(teacher, lambda: teacher(**inputs))
    return tiled_teacher_topk(teacher.get_output_embeddings(), hidden, k)


def micro_batch_losses(engine, teacher, runtime, batch, stage) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-> (weighted total, {name: unweighted term}). Shapes: input_ids [B, T] (T = the shard's length
    under sequence parallelism), labels [B, T] or shift_labels [B, T]."""
    w = stage.losses
    inputs = model_inputs(batch)
    targets = shifted_targets(batch)
    teacher_logp = teacher_ids = None
    if w.distill:
        teacher_logp, teacher_ids = teacher_targets(teacher, engine.module, runtime, inputs, stage.distill_topk)
    parts: dict[str, torch.Tensor] = {}
    if w.lm or w.distill:
        hidden = final_hidden_states(engine.module, lambda: engine(**inputs))
        ce_sum, kl_sum = tiled_token_losses(engine.module.get_output_embeddings(), hidden, targets,
                                            teacher_logp, teacher_ids)
        valid = group_valid_count(targets, runtime.sequence_parallel).clamp(min=1)
        if w.lm:
            parts["lm"] = ce_sum / valid
        if w.distill:
            parts["distill"] = kl_sum / valid
    else:  # indexer warm-up: the forward only feeds the layers' recorded losses; no logits needed
        final_hidden_states(engine.module, lambda: engine(**inputs))
    for name in ("indexer_kl", "ssa_align"):
        if getattr(w, name):
            value = runtime.mean_of(name)
            if value is None:
                raise RuntimeError(f"loss {name} is on but no layer recorded it (no retrieval heads in the plan?)")
            parts[name] = value
    total = sum(getattr(w, name) * value for name, value in parts.items())
    return total, parts
