#!/usr/bin/env python
"""Longest trainable context and training tokens/s at sequence-parallel sizes 1, 2, 4 (DeepSpeed Ulysses).

Driver (plain python, on a node with >= max(SP) GPUs): for each model and SP size it launches
`deepspeed --num_gpus SP` on this file in worker mode for doubling sequence lengths, each in its own
process (an out-of-memory rank would otherwise leave the others waiting in a collective), and stops
at the first length that fails. Results: one JSON file with every attempt and, per (model, SP), the
longest length that trained and its tokens/s.

    python benchmarks/bench_sequence_parallel.py --models smollm2-135m qwen2-1.5b-random --sp 1 2 4 \\
        --start 16384 --max-len 1048576 --out benchmarks/results/sequence_parallel_h200.json

Each worker: the real training step of a sparse_train stage (mode sparse, LM + indexer KL losses,
tiled logits, activation checkpointing, ZeRO-2, bf16, micro batch 1) on random tokens, with a 15%
retrieval-head plan balanced over the SP ranks; one warm-up step, then `--steps` timed steps.
SmolLM2-135M has 9 query / 3 KV heads: Ulysses cannot split it over 2 or 4 ranks (the run records the
validation error; SP=3 works). `qwen2-1.5b-random` is a randomly initialised Qwen2-1.5B shape
(28 layers, hidden 1536, 12 query / 2 KV heads, head dim 128, vocab 151936); `smollm2-135m-random`
is SmolLM2-135M's shape with random weights (speed and memory do not depend on the weights).
CPU smoke test: `python benchmarks/bench_sequence_parallel.py --models tiny-llama --sp 1 2 --start 256
--max-len 512 --device cpu --steps 1`.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QWEN2_15B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, head_dim=128, vocab_size=151936, max_position_embeddings=1 << 21,
                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=True)


# ---- worker ----------------------------------------------------------------------------------------
def build_model(name: str, device):
    import torch

    from rtpurbo_train.models import ModelConfig, load_model

    if name in ("qwen2-1.5b-random", "smollm2-135m-random"):
        from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

        from bench_train_step import SMOLLM2_SHAPE
        config = Qwen2Config(**QWEN2_15B) if name.startswith("qwen2") else LlamaConfig(
            **{**SMOLLM2_SHAPE, "max_position_embeddings": 1 << 21})
        torch.manual_seed(0)
        with torch.device(device):  # initialise on the GPU: a 1.5B CPU init takes a minute
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        return model
    overrides = {"max_position_embeddings": 1 << 21} if name.startswith("tiny-") else {}
    model, _ = load_model(ModelConfig(name_or_path=name, overrides=overrides), device=device)
    return model


def worker(args) -> None:
    import torch

    from rtpurbo_train import distributed as dist
    from rtpurbo_train.attention import attach_sparsity, attention_modules
    from rtpurbo_train.config.stages import LossWeights
    from rtpurbo_train.errors import UserError
    from rtpurbo_train.parallel import apply_kv_head_permutation, balanced_kv_head_permutation
    from rtpurbo_train.parallel.sp_loader import ulysses_adapter
    from rtpurbo_train.parallel.ulysses import enable_sequence_parallel, sequence_parallel_active
    from rtpurbo_train.parallel.validate import head_counts
    from rtpurbo_train.plan import HeadLayout, SparsityPlan
    from rtpurbo_train.trainer.engine import build_engine, load_ds_config
    from rtpurbo_train.trainer.step_losses import micro_batch_losses
    from types import SimpleNamespace

    device = dist.init()
    if args.device == "cpu":
        device = torch.device("cpu")
    result = {"model": args.model, "sp": args.sp_size, "seq_len": args.seq_len, "world": dist.world_size(),
              "top_k": args.top_k or None, "kl_selected_only": args.kl_selected_only}
    try:
        model = build_model(args.model, device)
        q, kv = head_counts(model.config)
        if q % args.sp_size or (kv % args.sp_size and args.sp_size % kv):
            raise UserError(f"{q} query / {kv} KV heads cannot be split over SP {args.sp_size}")
        layout = HeadLayout.from_config(model.config)
        gen = torch.Generator().manual_seed(0)
        scores = torch.rand(layout.num_layers, layout.num_q_heads, generator=gen).tolist()
        plan = SparsityPlan.from_scores(layout, scores, 0.15, window=args.window, sink_tokens=4, top_p=0.9,
                                        top_k=args.top_k or None)
        perm = balanced_kv_head_permutation(plan, args.sp_size)
        if perm is not None:
            plan = plan.model_copy(update={"kv_head_permutation": perm})
            apply_kv_head_permutation(attention_modules(model), perm, layout.group, layout.head_dim)
        runtime = attach_sparsity(model, plan, backend="auto")
        sp = enable_sequence_parallel(model, args.sp_size, micro_batch_size=1)
        runtime.set_mode("sparse")
        runtime.indexer_kl = True
        runtime.indexer_kl_selected_only = args.kl_selected_only
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        stage = SimpleNamespace(losses=LossWeights(lm=1.0, indexer_kl=1.0), distill_topk=10, micro_batch_size=1,
                                grad_accum=1, grad_clip=1.0, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0,
                                steps=100, warmup_steps=0, min_lr_ratio=1.0, type="sparse_train")
        engine = build_engine(model, model.parameters(), stage, load_ds_config("configs/zero2.json"), device=device,
                              dp_world=dist.world_size() // args.sp_size, mpu=sp.mpu if sp else None)
        vocab = model.config.vocab_size

        def batches():
            g = torch.Generator().manual_seed(dist.rank())
            while True:
                ids = torch.randint(0, vocab, (1, args.seq_len), generator=g)
                yield {"input_ids": ids, "labels": ids.clone()}

        source = ulysses_adapter(batches(), sp, device) if sp else (
            {**b, "position_ids": torch.arange(args.seq_len)[None]} for b in batches())
        times = []
        with sequence_parallel_active(runtime, sp):
            for step in range(args.steps + 1):
                batch = {k: v.to(device) for k, v in next(source).items()}
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                runtime.begin_step(step)
                loss, _ = micro_batch_losses(engine, None, runtime, batch, stage)
                engine.backward(loss)
                engine.step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        # --steps 0: the one step is the measurement (kernel compilation included): enough to find
        # the longest length that fits, where a step takes minutes
        step_s = times[0] if args.steps == 0 else sum(times[1:]) / (len(times) - 1)
        dp = dist.world_size() // args.sp_size
        result.update(ok=True, loss=float(loss), step_time_s=step_s, tokens_per_s=args.seq_len * dp / step_s,
                      peak_mem_gb=(torch.cuda.max_memory_allocated(device) / 2 ** 30) if device.type == "cuda" else None)
    except UserError as err:
        result.update(ok=False, error=f"invalid: {err}")
    except torch.cuda.OutOfMemoryError as err:  # this rank only; the driver's timeout ends the others
        result.update(ok=False, error=f"OOM: {str(err).splitlines()[0]}")
    if dist.is_main():
        Path(args.result).write_text(json.dumps(result))


# ---- driver ----------------------------------------------------------------------------------------
def attempt(model: str, sp: int, seq_len: int, args) -> dict:
    result_file = Path(args.out).with_suffix(f".{model}.sp{sp}.{seq_len}.json")
    result_file.unlink(missing_ok=True)
    cmd = ["deepspeed", "--num_gpus", str(sp), "--master_port", str(29500 + sp), __file__, "--worker",
           "--model", model, "--sp-size", str(sp), "--seq-len", str(seq_len), "--steps", str(args.steps),
           "--window", str(args.window), "--top-k", str(args.top_k), "--device", args.device, "--result", str(result_file)]
    if args.kl_selected_only:
        cmd.append("--kl-selected-only")
    env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    t0 = time.time()
    # Own process group: on a timeout the launcher's ranks must die too, or they keep their GPU memory
    # and the next attempt fails with a bogus OOM.
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        tail = proc.communicate(timeout=args.timeout)[0][-2000:]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        tail = "timeout"
    result = json.loads(result_file.read_text()) if result_file.is_file() else {
        "model": model, "sp": sp, "seq_len": seq_len, "ok": False,
        "error": "OOM" if "OutOfMemoryError" in tail or "out of memory" in tail else f"failed: {tail[-600:]}"}
    result["wall_s"] = time.time() - t0
    result_file.unlink(missing_ok=True)
    return result


def driver(args) -> None:
    report = {"command": " ".join([sys.executable] + sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "attempts": [], "longest": {}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    try:
        import torch
        report["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception:  # noqa: BLE001 - informative only
        pass
    for model in args.models:
        for sp in args.sp:
            best = None
            seq_len = args.start
            while seq_len <= args.max_len:
                result = attempt(model, sp, seq_len, args)
                report["attempts"].append(result)
                print(json.dumps(result), flush=True)
                if not result.get("ok"):
                    break
                best = result
                seq_len *= 2
            report["longest"][f"{model}/sp{sp}"] = best and {k: best[k] for k in ("seq_len", "tokens_per_s", "peak_mem_gb")}
            Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report["longest"], indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2-1.5b-random"])
    p.add_argument("--sp", nargs="+", type=int, default=[1, 2, 4])
    p.add_argument("--start", type=int, default=16384)
    p.add_argument("--max-len", type=int, default=1 << 20)
    p.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step (0: one timed step)")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--top-k", type=int, default=0, help="retrieval heads keep this many key blocks (0: top-p 0.9)")
    p.add_argument("--kl-selected-only", action="store_true",
                   help="indexer KL over the selected blocks only (linear in the length with --top-k)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per attempt")
    p.add_argument("--device", choices=["auto", "cpu"], default="auto")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "sequence_parallel_h200.json"))
    # worker mode (launched by the driver through deepspeed)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--sp-size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    worker(args) if args.worker else driver(args)


if __name__ == "__main__":
    main()
