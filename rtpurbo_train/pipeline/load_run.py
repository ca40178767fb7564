"""Rebuild a run's model from its output directory (for the export and evaluate commands)."""
from __future__ import annotations

from pathlib import Path

import yaml

from .. import distributed as dist
from ..config import validate_recipe
from ..errors import UserError
from ..trainer.checkpoint import load_module_state
from ..trainer.monitor import Monitor
from .context import RunContext
from .state import completed_stages


def load_run(run_dir: str, device=None, checkpoint: str | None = None) -> RunContext:
    """The run's model with its plan and the weights of its last completed training stage (or of
    `checkpoint`: a `checkpoints/<stage>/step_<N>` folder written with ZeRO stage 0-2)."""
    import torch

    run = Path(run_dir)
    if not (run / "recipe.yaml").is_file():
        raise UserError(f"{run} is not a run directory (no recipe.yaml); pass the --output-dir of a training run")
    recipe = validate_recipe(yaml.safe_load((run / "recipe.yaml").read_text()), str(run / "recipe.yaml"))
    device = device or torch.device("cpu")
    ctx = RunContext(recipe=recipe, out_dir=run, device=device, monitor=Monitor(run, tensorboard=False), ds_base={})
    if not (run / "plan.json").is_file():
        raise UserError(f"{run} has no plan.json yet: the run has not finished its calibrate stage")
    ctx.ensure_plan()
    if checkpoint is not None:
        _load_deepspeed_module(ctx.model, Path(checkpoint))
        return ctx
    trained = [name for stage, name in zip(recipe.stages, recipe.stage_names())
               if stage.type in ("indexer_warmup", "sparse_train") and name in completed_stages(run)]
    if trained:
        ctx.load_final(run / "checkpoints" / trained[-1])
    elif dist.is_main():
        ctx.monitor.info(f"{run}: no completed training stage; using the base weights with fresh indexers")
    return ctx


def _load_deepspeed_module(model, folder: Path) -> None:
    import torch

    files = sorted(folder.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise UserError(f"{folder} is not a DeepSpeed checkpoint folder (no mp_rank_*_model_states.pt)")
    try:
        state = torch.load(files[0], map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling refusal is reported the same way
        raise UserError(f"{files[0]} could not be read safely (weights_only): {err}") from None
    module = state.get("module")
    if not module:
        raise UserError(f"{files[0]} holds no module weights (ZeRO-3 checkpoints: use the stage's final weights)")
    load_module_state(model, module, files[0])
