"""The DeepSpeed config a training stage gets (trainer/engine.py)."""
import torch

from rtpurbo_train.config import load_recipe
from rtpurbo_train.trainer.engine import stage_ds_config


def test_cpu_stage_gets_torch_fused_adamw_and_no_offload():
    stage = load_recipe("quickstart").stages[2]
    base = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    cfg = stage_ds_config(base, stage, device=torch.device("cpu"), dp_world=2)
    params = cfg["optimizer"]["params"]
    assert cfg["optimizer"]["type"] == "AdamW" and params["torch_adam"] and params["fused"] is True
    assert "offload_optimizer" not in cfg["zero_optimization"] and "offload_optimizer" in base["zero_optimization"]
    assert cfg["train_batch_size"] == stage.micro_batch_size * stage.grad_accum * 2 and not cfg["bf16"]["enabled"]

    # what DeepSpeed builds from it (torch_adam: torch.optim.AdamW with the other params) takes one fused step
    weight = torch.nn.Parameter(torch.ones(4))
    weight.grad = torch.ones(4)
    optimizer = torch.optim.AdamW([weight], **{k: v for k, v in params.items() if k != "torch_adam"})
    optimizer.step()
    assert optimizer.defaults["fused"] and torch.all(weight < 1)
