"""Run a recipe: its stages in order, in one launch, resuming whatever a previous launch finished."""
from __future__ import annotations

import time

from .. import distributed as dist
from ..config import dump_recipe
from ..errors import UserError
from ..trainer import preemption
from ..trainer.engine import load_ds_config
from ..trainer.loop import train_stage
from ..trainer.monitor import Monitor
from .context import RunContext
from .output_dir import resolve_output_dir
from .stage_calibrate import run_calibrate
from .stage_evaluate import run_evaluate
from .stage_export import run_export
from .state import completed_stages, mark_completed

TRAINING = ("indexer_warmup", "sparse_train")
DONE_FILE = "DONE"  # written last: cluster entry points tell a finished run from a stopped one


def check_data_sources(recipe) -> None:
    """The data sources' paths, when a stage reads them (training and evaluation stages); a launch and
    `--dry-run` stop on the same one-line error."""
    from ..data import check_sources

    if any(s.type in TRAINING + ("evaluate",) for s in recipe.stages):
        check_sources(recipe.data)


def check_inputs(recipe, out_dir) -> None:
    """What later stages read, checked before anything is written or loaded: the sparsity plan (without a
    calibrate stage), then the data sources' paths."""
    from pathlib import Path

    from .context import NO_PLAN

    kinds = [s.type for s in recipe.stages]
    if "calibrate" not in kinds and not recipe.sparsity.plan and not (Path(out_dir) / "plan.json").is_file():
        raise UserError(NO_PLAN)
    check_data_sources(recipe)


def run_recipe(recipe, output_dir: str | None = None) -> RunContext:
    device = dist.init()
    ds_base = load_ds_config(recipe.deepspeed.config)
    out_dir, resuming = resolve_output_dir(recipe, output_dir)
    check_inputs(recipe, out_dir)
    if dist.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "recipe.yaml").write_text(dump_recipe(recipe))
    dist.barrier()
    preemption.install()
    monitor = Monitor(out_dir, tensorboard=recipe.logging.tensorboard, progress=recipe.logging.progress)
    monitor.info(f"{'resuming' if resuming else 'starting'} recipe {recipe.name} in {out_dir} "
                 f"({dist.world_size()} process(es), {device.type})")
    ctx = RunContext(recipe=recipe, out_dir=out_dir, device=device, monitor=monitor, ds_base=ds_base)

    done = completed_stages(out_dir)
    names = recipe.stage_names()
    last_trained = None  # the stage whose final weights a resumed run starts from
    global_offset = 0
    started = time.time()
    for stage, name in zip(recipe.stages, names):
        if name in done:
            monitor.info(f"{name}: already complete, skipped")
            if stage.type in TRAINING:
                last_trained, global_offset = name, global_offset + stage.steps
            continue
        if stage.type != "calibrate":
            ctx.ensure_plan()
            if last_trained is not None:
                ctx.load_final(out_dir / "checkpoints" / last_trained)
                last_trained = None
        t0 = time.time()
        if stage.type == "calibrate":
            run_calibrate(ctx, stage, name)
        elif stage.type in TRAINING:
            train_stage(ctx, stage, name, global_offset)
            global_offset += stage.steps
        elif stage.type == "export":
            run_export(ctx, stage, name)
        elif stage.type == "evaluate":
            run_evaluate(ctx, stage, name)
        mark_completed(out_dir, name)
        monitor.info(f"{name}: done in {time.time() - t0:.1f}s")
    if dist.is_main():
        (out_dir / DONE_FILE).write_text(f"finished {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    monitor.info(f"recipe {recipe.name} finished in {time.time() - started:.1f}s; outputs in {out_dir}")
    if dist.is_main() and monitor.summary:
        print(monitor.summary_table(), flush=True)
    monitor.close()
    return ctx
