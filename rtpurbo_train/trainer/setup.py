"""What a training stage trains, and its teacher.

- indexer_warmup: backbone frozen, dense attention; only the indexers train, from the indexer KL.
- sparse_train: sparse (or SSA `both`) attention; the whole model (or LoRA adapters) trains, the
  indexers too when `train_indexer` (they learn only from the indexer KL: their inputs are detached
  and the selection has no gradient).
"""
from __future__ import annotations

from ..attention import indexer_parameters


def _set_trainable(model, predicate) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(bool(predicate(name)))


def prepare_stage_model(ctx, stage):
    """Set up ctx.model/ctx.runtime for `stage`; return the teacher (None = LoRA adapters disabled, or none)."""
    runtime = ctx.runtime
    runtime.indexer_kl_selected_only = False
    runtime.indexer_kl_stride = stage.kl_stride()
    ctx.model.train()
    if stage.type == "indexer_warmup":
        runtime.set_mode("full")
        runtime.indexer_kl = True
        _set_trainable(ctx.model, lambda n: ".indexer." in n)
        if ctx.recipe.deepspeed.activation_checkpointing:
            ctx.model.gradient_checkpointing_disable()  # nothing to recompute: the backbone has no grad
        return None

    runtime.set_mode(stage.mode)
    runtime.indexer_kl = stage.losses.indexer_kl > 0
    runtime.indexer_kl_selected_only = stage.kl_selected_only
    if ctx.recipe.deepspeed.activation_checkpointing:
        ctx.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if stage.lora is not None:
        ctx.model = _wrap_lora(ctx.model, stage.lora)
        _set_trainable(ctx.model, lambda n: "lora_" in n or (stage.train_indexer and ".indexer." in n))
        return None
    _set_trainable(ctx.model, lambda n: stage.train_indexer or ".indexer." not in n)
    if stage.losses.distill:
        return ctx.load_teacher()
    return None


def _wrap_lora(model, lora):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, config)


__all__ = ["prepare_stage_model", "indexer_parameters"]
