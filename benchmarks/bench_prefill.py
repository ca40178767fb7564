"""Prefill time of the sparse model vs dense SDPA, on one GPU (the training-time model and kernels).

    python benchmarks/bench_prefill.py --model qwen2-1.5b-shape --lengths 32768 131072 --out results.md

`qwen2-1.5b-shape`: a random-weight model with Qwen2-1.5B's shape (28 layers, hidden 1536, 12 query /
2 KV heads, head_dim 128); `smollm2-135m`: the real model. Retrieval heads: the top 15% of KV heads by
random scores (speed does not depend on which); window and top-p as the default recipe
(window 1024 for SmolLM2 at 8K; 8192 at 32K+, the paper's setting). Times are CUDA-event medians
(triton.testing.do_bench) of a no-cache forward that keeps only the last logits.
"""
from __future__ import annotations

import argparse

import torch

from result_file import emit, provenance


def build(name: str):
    from transformers import AutoModelForCausalLM, Qwen2Config

    if name == "qwen2-1.5b-shape":
        cfg = Qwen2Config(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                          num_key_value_heads=2, head_dim=128, vocab_size=151936, max_position_embeddings=131072,
                          rope_parameters={"rope_type": "default", "rope_theta": 1e6})
        with torch.device("cuda"):
            return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    from rtpurbo_train.models import ModelConfig, load_model
    model, _ = load_model(ModelConfig(name_or_path=name, dtype="bfloat16"), device="cuda")
    return model


def main(argv=None):
    from triton.testing import do_bench

    from rtpurbo_train.attention import attach_sparsity
    from rtpurbo_train.plan import HeadLayout, SparsityPlan

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="qwen2-1.5b-shape")
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--window", type=int, default=8192)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    model = build(args.model).eval()
    layout = HeadLayout.from_config(model.config)
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(layout.num_layers, layout.num_q_heads, generator=gen).tolist()
    plan = SparsityPlan.from_scores(layout, scores, 0.15, window=args.window, top_p=args.top_p)
    runtime = attach_sparsity(model, plan, backend="triton")
    model.model.layers.to(torch.bfloat16)
    rows = []
    for T in args.lengths:
        ids = torch.randint(0, model.config.vocab_size, (1, T), device="cuda")
        cells = {}
        for mode in ("full", "sparse"):
            def fwd():
                with torch.no_grad(), runtime.use_mode(mode):
                    model(input_ids=ids, use_cache=False, logits_to_keep=1)
            try:
                cells[mode] = do_bench(fwd, warmup=1, rep=1, return_mode="median")
            except torch.OutOfMemoryError:
                cells[mode] = float("nan")
            torch.cuda.empty_cache()
        with torch.no_grad(), runtime.use_mode("sparse"), runtime.measuring():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
        m = runtime.pop_metrics()
        rows.append((T, cells["full"], cells["sparse"], cells["full"] / cells["sparse"], m.get("sparsity/mean", float("nan"))))
        print(f"T={T}: dense {cells['full']:.1f} ms, sparse {cells['sparse']:.1f} ms, speedup {rows[-1][3]:.2f}x, "
              f"block sparsity {rows[-1][4]:.3f}", flush=True)
    lines = [f"# Prefill, sparse vs dense: {args.model}", "", *provenance("bench_prefill.py", argv),
             f"- plan: 15% retrieval KV heads, window {args.window}, sink 4, top-p {args.top_p}, block 64; bf16; "
             "no-cache forward, last-token logits; CUDA-event median", "",
             "| tokens | dense SDPA (ms) | sparse (ms) | speedup | block sparsity |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {T} | {d:.1f} | {s:.1f} | {x:.2f}x | {sp:.3f} |" for T, d, s, x, sp in rows]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
