"""A DeepSpeed engine for one training stage: the recipe's JSON config, filled in with the stage's
batch sizes, optimizer, clipping and precision (bf16 on GPU, fp32 on CPU)."""
from __future__ import annotations

import json
from pathlib import Path

import deepspeed
import torch

from ..errors import UserError
from ..paths import REPO_ROOT
from .schedule import warmup_cosine


def load_ds_config(path: str) -> dict:
    p = Path(path)
    if not p.is_absolute() and not p.is_file():
        p = REPO_ROOT / path
    if not p.is_file():
        raise UserError(f"DeepSpeed config {path} not found (looked in . and {REPO_ROOT})")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"DeepSpeed config {p} is not valid JSON: {err}") from None


def stage_ds_config(base: dict, stage, *, device: torch.device, dp_world: int) -> dict:
    cfg = json.loads(json.dumps(base))
    cfg["train_micro_batch_size_per_gpu"] = stage.micro_batch_size
    cfg["gradient_accumulation_steps"] = stage.grad_accum
    cfg["train_batch_size"] = stage.micro_batch_size * stage.grad_accum * dp_world
    cfg["gradient_clipping"] = stage.grad_clip
    cfg["optimizer"] = {"type": "AdamW", "params": {"lr": stage.lr, "betas": list(stage.betas), "eps": 1e-8,
                                                    "weight_decay": stage.weight_decay,
                                                    # torch's AdamW: no JIT-compiled CUDA op to build
                                                    "torch_adam": True}}
    on_gpu = device.type == "cuda"
    cfg["bf16"] = {"enabled": on_gpu and torch.cuda.is_bf16_supported()}
    cfg.pop("fp16", None)
    cfg.setdefault("steps_per_print", 10 ** 9)
    cfg.setdefault("wall_clock_breakdown", False)
    if not on_gpu:
        zero = cfg.setdefault("zero_optimization", {})
        for key in ("offload_optimizer", "offload_param"):
            zero.pop(key, None)  # CPU runs already live in host memory
        # torch's default AdamW on CPU runs a dozen tensor ops per parameter tensor (1.15 s a step for the
        # quickstart's ZeRO-2 half of SmolLM2 on one core); its fused CPU kernel: the same update in 0.27 s
        cfg["optimizer"]["params"]["fused"] = True
    return cfg


def build_engine(model, parameters, stage, ds_base: dict, *, device, dp_world: int, mpu=None):
    cfg = stage_ds_config(ds_base, stage, device=device, dp_world=dp_world)
    params = [p for p in parameters if p.requires_grad]
    if not params:
        raise UserError(f"stage {stage.type}: nothing to train (no parameter requires grad)")
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=cfg, mpu=mpu,
                                                   lr_scheduler=lambda opt: warmup_cosine(
                                                       opt, steps=stage.steps, warmup_steps=stage.warmup_steps,
                                                       min_lr_ratio=stage.min_lr_ratio))
    return engine
