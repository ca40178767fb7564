"""One training stage (indexer_warmup or sparse_train), top to bottom:
batch -> forward (mode) -> losses -> engine.backward -> engine.step -> log -> maybe checkpoint/eval."""
from __future__ import annotations

import math
import time
from collections import defaultdict

import torch

from .. import distributed as dist
from ..errors import UserError
from ..parallel.loss_shares import reduce_metrics, shifted_targets
from ..parallel.ulysses import sequence_parallel_active
from . import checkpoint as ckpt
from . import preemption
from .engine import build_engine
from .setup import prepare_stage_model
from .step_losses import micro_batch_losses

MAX_BAD_IN_A_ROW = 5


def train_stage(ctx, stage, name: str, global_offset: int) -> None:
    monitor, runtime = ctx.monitor, ctx.runtime
    stage_dir = ctx.out_dir / "checkpoints" / name
    teacher = prepare_stage_model(ctx, stage)  # freezes/unfreezes, LoRA, runtime mode, teacher
    engine = build_engine(ctx.model, ctx.model.parameters(), stage, ctx.ds_base, device=ctx.device,
                          dp_world=ctx.dp_world, mpu=ctx.sp.mpu if ctx.sp is not None else None)
    # Under sequence parallelism the attention runs inside Ulysses for the stage (not for export/eval).
    with sequence_parallel_active(runtime, ctx.sp):
        loader = ctx.train_loader(stage, name)
        data = loader.stats()
        monitor.info(f"{name}: data {data['documents']} documents -> {data['sequences']} sequences of {stage.seq_len} "
                     f"tokens; skipped records: {data['skipped'] or 'none'}")
        eval_batches = ctx.eval_batches(stage, name)

        step = 0
        resume_step = ckpt.latest_step(stage_dir) if stage_dir.is_dir() else None
        if resume_step is not None:
            state, own = ckpt.load(engine, stage_dir, resume_step)
            step = state["step"]
            loader.load_state_dict(own["data"])
            monitor.info(f"{name}: resumed from checkpoint step {step} ({stage_dir / f'step_{step}'})")

        monitor.start_stage(name, stage.steps, step, global_offset)
        bad_in_a_row, skipped_batches = 0, 0
        last_saved = step
        while step < stage.steps:
            runtime.begin_step(global_offset + step)
            runtime.measure = (step + 1) % stage.log_every == 0
            sums: dict[str, float] = defaultdict(float)
            tokens, t0 = 0, time.perf_counter()
            done_micro = 0
            while done_micro < stage.grad_accum:
                batch = {k: v.to(ctx.device) for k, v in next(loader).items()}
                loss, parts = micro_batch_losses(engine, teacher, runtime, batch, stage)
                if dist.any_rank(not torch.isfinite(loss.detach()).item(), ctx.device):
                    bad_in_a_row += 1
                    skipped_batches += 1
                    monitor.info(f"{name} step {step + 1}: non-finite loss, batch skipped ({bad_in_a_row} in a row)")
                    if bad_in_a_row >= MAX_BAD_IN_A_ROW:
                        raise UserError(f"{name}: {bad_in_a_row} non-finite losses in a row at step {step + 1}; "
                                        f"lower the learning rate or check the data (last checkpoint: step {last_saved})")
                    continue
                bad_in_a_row = 0
                engine.backward(loss)
                engine.step()
                done_micro += 1
                sums["loss"] += loss.item()
                for key, value in parts.items():
                    sums[f"loss_{key}"] += value.item()
                if runtime.measure:
                    sums.update(_per_layer_losses(runtime, sums))
                tokens += int((shifted_targets(batch) != -100).sum())
            step += 1
            monitor.advance()

            if step % stage.log_every == 0 or step == stage.steps:
                metrics = _step_metrics(ctx, engine, sums, stage.grad_accum, tokens, time.perf_counter() - t0,
                                        runtime.pop_metrics())
                metrics["train/skipped_batches"] = float(skipped_batches)
                metrics["data/epoch"] = float(loader.stats()["epoch"])
                monitor.log(name, step, global_offset + step, metrics)
            if stage.eval_every and step % stage.eval_every == 0 and step < stage.steps:
                monitor.log(name, step, global_offset + step,
                            evaluate_losses(engine, teacher, runtime, eval_batches, stage, dp_world=ctx.dp_world))
            preempted = dist.any_rank(preemption.requested() is not None, ctx.device)
            if step % stage.save_every == 0 or step == stage.steps or preempted:
                ckpt.save(engine, stage_dir, step, {"step": step}, {"data": loader.state_dict()})
                last_saved = step
            if preempted:
                monitor.end_stage()
                raise preemption.Preempted(f"{name}: checkpoint at step {step} saved after {preemption.requested() or 'a signal'}")

        monitor.log(name, step, global_offset + step,
                    evaluate_losses(engine, teacher, runtime, eval_batches, stage, dp_world=ctx.dp_world))
        monitor.end_stage()
    ctx.finish_stage_model(engine, stage, stage_dir)


def _per_layer_losses(runtime, sums) -> dict[str, float]:
    """Running sums of each layer's indexer KL and SSA alignment term (`indexer_kl/layer3`); they are
    loss shares like the totals, so they reduce the same way."""
    out = {}
    for name in ("indexer_kl", "ssa_align"):
        for layer, value in runtime.records.get(name, {}).items():
            key = f"{name}/layer{layer}"
            out[key] = sums.get(key, 0.0) + float(value.detach())
    return out


def _step_metrics(ctx, engine, sums, grad_accum, tokens, seconds, measured) -> dict[str, float]:
    """Losses are per-rank shares under sequence parallelism: `reduce_metrics` sums them over SP."""
    reduced = reduce_metrics({f"train/{k}": v / grad_accum for k, v in sums.items()},
                             {**measured, "tokens": float(tokens)}, dp_world=ctx.dp_world, device=ctx.device)
    metrics = {k: v for k, v in reduced.items() if k != "tokens"}
    metrics["train/lr"] = float(engine.get_lr()[0])
    grad_norm = engine.get_global_grad_norm()
    if grad_norm is not None and math.isfinite(float(grad_norm)):
        metrics["train/grad_norm"] = float(grad_norm)
    metrics["train/step_time_s"] = seconds
    metrics["train/tokens_per_s"] = reduced["tokens"] * dist.world_size() / max(seconds, 1e-9)
    if ctx.device.type == "cuda":
        metrics["train/peak_mem_gb"] = torch.cuda.max_memory_allocated(ctx.device) / 2 ** 30
    return metrics


@torch.no_grad()
def evaluate_losses(engine, teacher, runtime, batches, stage, dp_world: int | None = None) -> dict[str, float]:
    """The stage's losses on held-out batches, with sparsity/recall measured."""
    if not batches:
        return {}
    losses: dict[str, float] = defaultdict(float)
    measured: dict[str, float] = defaultdict(float)
    was_training = engine.module.training
    engine.module.eval()
    with runtime.measuring(), runtime.exact_kl():
        for i, batch in enumerate(batches):
            runtime.begin_step(-1 - i)
            loss, parts = micro_batch_losses(engine, teacher, runtime, batch, stage)
            losses["eval/loss"] += loss.item() / len(batches)
            for key, value in parts.items():
                losses[f"eval/loss_{key}"] += value.item() / len(batches)
            for key, value in runtime.pop_metrics().items():
                measured[f"eval/{key}"] += value / len(batches)
    engine.module.train(was_training)
    return reduce_metrics(losses, measured, dp_world=dp_world or dist.world_size(), device=engine.device)
