#!/usr/bin/env python
"""Steady-state time of one training micro-batch of each stage, and where it goes, on one GPU.

    python benchmarks/bench_train_step.py --seq-len 8192 --out train_step.md

The model is SmolLM2-135M's shape with random weights (30 layers, hidden 576, 9 query / 3 KV heads,
vocab 49152; the real weights do not change the time), bf16 under DeepSpeed ZeRO-2 as in the
pipeline, a 15% retrieval-head plan (window 1024, sink 4, top-p 0.9). Two stages as the
rtpurbo_300step recipe runs them:
- indexer_warmup: dense attention, backbone frozen, indexer KL only;
- sparse_train: frozen dense teacher (top-10) + sparse student, distillation + indexer KL,
  activation checkpointing.
Per stage: `--warmup` untimed micro-batches (kernel compilation), then `--iters` micro-batches timed
with CUDA events (median), then one micro-batch under torch.profiler: the top CUDA kernels and how
many host<->device synchronisations the step makes (torch.cuda.set_sync_debug_mode).
"""
from __future__ import annotations

import argparse
import collections
import copy
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.autograd import DeviceType

from result_file import emit, provenance

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
                     rope_theta=100000.0, tie_word_embeddings=True)


def build(args, device):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from rtpurbo_train.attention import attach_sparsity
    from rtpurbo_train.plan import HeadLayout, SparsityPlan

    cfg = LlamaConfig(**{**SMOLLM2_SHAPE, "max_position_embeddings": max(8192, args.seq_len)})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).to(device)
    # its own config: attach_sparsity switches the student's config to the rtpurbo attention
    teacher = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), dtype=torch.bfloat16).to(device)
    teacher.load_state_dict(model.state_dict())
    teacher.eval().requires_grad_(False)
    layout = HeadLayout.from_config(cfg)
    scores = torch.rand(layout.num_layers, layout.num_q_heads, generator=torch.Generator().manual_seed(0)).tolist()
    plan = SparsityPlan.from_scores(layout, scores, 0.15, window=args.window, sink_tokens=4, top_p=0.9)
    runtime = attach_sparsity(model, plan, backend="auto")
    return model, teacher, runtime


def stage_config(kind: str, args):
    from rtpurbo_train.config.stages import LossWeights

    losses = LossWeights(indexer_kl=1.0) if kind == "indexer_warmup" else LossWeights(distill=1.0, indexer_kl=1.0)
    return SimpleNamespace(type=kind, losses=losses, distill_topk=10, micro_batch_size=args.micro_batch, grad_accum=1,
                           grad_clip=1.0, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0, steps=10 ** 6,
                           warmup_steps=0, min_lr_ratio=1.0)


def prepare(kind, model, runtime):
    """What trainer/setup.py does for the stage (without a pipeline context)."""
    model.train()
    if kind == "indexer_warmup":
        runtime.set_mode("full")
        runtime.indexer_kl = True
        for name, p in model.named_parameters():
            p.requires_grad_(".indexer." in name)
        model.gradient_checkpointing_disable()
    else:
        runtime.set_mode("sparse")
        runtime.indexer_kl = True
        for p in model.parameters():
            p.requires_grad_(True)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def measure_stage(kind, model, teacher, runtime, args, device, lines):
    from rtpurbo_train.trainer.engine import build_engine, load_ds_config
    from rtpurbo_train.trainer.step_losses import micro_batch_losses

    prepare(kind, model, runtime)
    stage = stage_config(kind, args)
    engine = build_engine(model, model.parameters(), stage, load_ds_config("configs/zero2.json"), device=device,
                          dp_world=1)
    gen = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    use_teacher = teacher if stage.losses.distill else None

    def micro_batch(step):
        ids = torch.randint(0, vocab, (args.micro_batch, args.seq_len), generator=gen).to(device)
        runtime.begin_step(step)
        loss, _ = micro_batch_losses(engine, use_teacher, runtime, {"input_ids": ids, "labels": ids}, stage)
        engine.backward(loss)
        engine.step()
        return loss

    for step in range(args.warmup):
        micro_batch(step)
    times = []
    for step in range(args.iters):
        times.append(timed_ms(lambda: micro_batch(args.warmup + step), device))
    ms = statistics.median(times)
    tokens = args.micro_batch * args.seq_len
    lines.append(f"## {kind}\n\nmicro-batch of {args.micro_batch} x {args.seq_len} tokens: median {ms:.1f} ms over "
                 f"{args.iters} (min {min(times):.1f}, max {max(times):.1f}); {tokens / ms * 1e3:,.0f} tokens/s\n")

    syncs = collections.Counter()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            micro_batch(10 ** 5)
            if cuda:
                torch.cuda.synchronize()
    if cuda:
        torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message):
            syncs[f"{Path(w.filename).name}:{w.lineno}"] += 1
    events = prof.key_averages()
    # Kernel rows only: an op row (aten::mm) carries the time of the kernels it launched again.
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    what = "sum of kernel time"
    if not kernels:  # no per-kernel rows (CPU runs): op rows, which count some time twice
        kernels, what = list(events), "sum of op and kernel rows, an upper bound"
    cuda_total = sum(e.self_device_time_total for e in kernels) / 1e3 if cuda else 0.0
    lines.append(f"profiled micro-batch: GPU busy {cuda_total:.1f} ms ({what}); host synchronisations: "
                 f"{sum(syncs.values())}\n")
    lines.append("| kernel | calls | GPU ms | share |\n| --- | --- | --- | --- |")
    top = sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[:args.top]
    for e in top:
        t = e.self_device_time_total / 1e3
        lines.append(f"| `{e.key[:90]}` | {e.count} | {t:.2f} | {t / max(cuda_total, 1e-9):.1%} |")
    lines.append("")
    if syncs:
        lines.append("| synchronisation at | count |\n| --- | --- |")
        for where, n in syncs.most_common(15):
            lines.append(f"| {where} | {n} |")
        lines.append("")
    lines.append("| CPU op (self time) | calls | CPU ms |\n| --- | --- | --- |")
    for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]:
        lines.append(f"| `{e.key[:90]}` | {e.count} | {e.self_cpu_time_total / 1e3:.2f} |")
    lines.append("")
    engine.destroy() if hasattr(engine, "destroy") else None
    return ms


def timed_ms(fn, device) -> float:
    """Milliseconds of fn() on the device: CUDA events on a GPU, wall clock on the CPU (smoke runs)."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--stages", nargs="+", default=["indexer_warmup", "sparse_train"])
    p.add_argument("--layers", type=int, default=None, help="fewer layers (CPU smoke runs)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.layers:
        SMOLLM2_SHAPE["num_hidden_layers"] = args.layers
    from rtpurbo_train import distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29611")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    device = dist.init()
    model, teacher, runtime = build(args, device)
    lines = [f"# Training micro-batch time, SmolLM2-135M shape, {args.seq_len} tokens\n",
             *provenance("bench_train_step.py", argv), ""]
    for kind in args.stages:
        measure_stage(kind, model, teacher, runtime, args, device, lines)
    emit(lines, args.out)


if __name__ == "__main__":
    main()
