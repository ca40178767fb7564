"""A CPU copy of the trained model with wrappers removed and LoRA merged, safe to change and save.

The trained model is never modified: it may still be training (export at an eval point), and merging
then unmerging LoRA in place would round the frozen base weights.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import PreTrainedModel

from ..errors import UserError


def _shared_with_copy(key: str, value) -> bool:
    """Module attributes the copy shares instead of copying: the training runtime (`rtpurbo_*`, whose
    loss records hold autograd graphs that cannot be deep-copied) and stray tensors (stashed RoPE)."""
    return key.lstrip("_").startswith("rtpurbo") or isinstance(value, torch.Tensor)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DeepSpeed-engine / DDP-style `.module` wrappers and torch.compile's `_orig_mod`; keep peft
    (a peft model has no `.module`) and stop at the transformers model."""
    seen = set()
    while id(model) not in seen and not isinstance(model, PreTrainedModel):
        seen.add(id(model))
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
    return model


def _check_materialised(model: nn.Module) -> None:
    for name, param in model.named_parameters():
        if getattr(param, "ds_id", None) is not None and param.numel() == 0:
            raise UserError(f"parameter {name} is partitioned by DeepSpeed ZeRO-3: gather the parameters "
                            "(deepspeed.zero.GatheredParameters) or export from a consolidated checkpoint")
        if param.is_meta:
            raise UserError(f"parameter {name} is on the meta device (the model was never loaded): nothing to export")


def cpu_copy(model: nn.Module) -> nn.Module:
    """Deep copy with every parameter and buffer copied to the CPU first (no second GPU copy)."""
    _check_materialised(model)
    memo: dict[int, object] = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) in memo:
            continue
        data = tensor.detach().to("cpu", copy=True)
        memo[id(tensor)] = nn.Parameter(data, requires_grad=False) if isinstance(tensor, nn.Parameter) else data
    for module in model.modules():
        for key, value in module.__dict__.items():
            if _shared_with_copy(key, value):
                memo.setdefault(id(value), value)
    return copy.deepcopy(model, memo)


def merged_cpu_model(model: nn.Module) -> nn.Module:
    """Unwrapped CPU copy of `model`; a peft model comes back with its adapters merged and removed."""
    model = unwrap_model(model)
    copied = cpu_copy(model)
    if hasattr(copied, "merge_and_unload") and hasattr(copied, "peft_config"):
        copied = copied.merge_and_unload()
    if not hasattr(copied, "config") or not hasattr(copied, "save_pretrained"):
        raise UserError(f"cannot export a {type(copied).__name__}: expected a transformers causal LM (or a peft / "
                        "DeepSpeed wrapper around one)")
    return copied
