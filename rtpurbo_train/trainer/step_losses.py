"""The losses of one micro-batch: teacher pass (no grad), student forward, weighted sum."""
from __future__ import annotations

import torch

from ..losses import lm_loss, teacher_topk, topk_distillation_loss


@torch.no_grad()
def teacher_targets(teacher, student, runtime, input_ids, k):
    """Top-k log-probs of the dense teacher. With LoRA the teacher is the student with its adapters
    disabled (no extra memory); otherwise a frozen dense copy of the original model."""
    if teacher is None:
        with student.disable_adapter(), runtime.teacher_pass():
            logits = student(input_ids=input_ids, use_cache=False).logits
    else:
        logits = teacher(input_ids=input_ids, use_cache=False).logits
    return teacher_topk(logits[:, :-1], k)


def micro_batch_losses(engine, teacher, runtime, batch, stage) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-> (weighted total, {name: unweighted term}). Shapes: input_ids/labels [B, T]."""
    w = stage.losses
    input_ids, labels = batch["input_ids"], batch["labels"]
    targets = None
    if w.distill:
        targets = teacher_targets(teacher, engine.module, runtime, input_ids, stage.distill_topk)
    logits = engine(input_ids=input_ids, use_cache=False).logits
    parts: dict[str, torch.Tensor] = {}
    if w.lm:
        parts["lm"] = lm_loss(logits, labels)
    if w.distill:
        valid = labels[:, 1:] != -100
        parts["distill"] = topk_distillation_loss(logits[:, :-1], *targets, valid)
    for name in ("indexer_kl", "ssa_align"):
        if getattr(w, name):
            value = runtime.mean_of(name)
            if value is None:
                raise RuntimeError(f"loss {name} is on but no layer recorded it (no retrieval heads in the plan?)")
            parts[name] = value
    total = sum(getattr(w, name) * value for name, value in parts.items())
    return total, parts
