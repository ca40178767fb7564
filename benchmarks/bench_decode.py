"""Decode speed of the exported sparse model vs the plain (dense) model, on one GPU.

    python benchmarks/bench_decode.py --prompt 32768 --new 64 --out decode.md

Builds a random-weight model with Qwen2-1.5B's shape (28 layers, hidden 1536, 12 query / 2 KV heads,
head dim 128), a plan with the top 15% of KV heads by random scores (window 8192, sink 4, top-p 0.9),
exports it (bf16), then loads the folder twice: plain (`trust_remote_code=False`, dense attention and
transformers' DynamicCache) and sparse (`trust_remote_code=True`, streaming heads keep sink + window).
Decode time per token = (generate(prompt, new) - generate(prompt, 1)) / (new - 1), greedy, CUDA-synced
wall clock, median of 3. Also the KV-cache bytes after the prompt.
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time

import torch


def build_and_export(folder, args):
    from transformers import AutoModelForCausalLM, Qwen2Config

    from rtpurbo_train.attention import attach_sparsity
    from rtpurbo_train.export import export_model
    from rtpurbo_train.models import build_byte_tokenizer
    from rtpurbo_train.plan import HeadLayout, SparsityPlan

    tok = build_byte_tokenizer(model_max_length=args.prompt + args.new + 8)
    cfg = Qwen2Config(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
                      vocab_size=len(tok), max_position_embeddings=args.prompt + args.new + 64,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    layout = HeadLayout.from_config(model.config)
    scores = torch.rand(layout.num_layers, layout.num_q_heads, generator=torch.Generator().manual_seed(0)).tolist()
    plan = SparsityPlan.from_scores(layout, scores, 0.15, window=args.window, top_p=0.9)
    attach_sparsity(model, plan, backend="reference")
    export_model(model, tok, plan, folder, dtype="bfloat16")
    return plan


def timed_generate(model, ids, new):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=True)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv=None):
    from transformers import AutoModelForCausalLM

    p = argparse.ArgumentParser()
    p.add_argument("--prompt", type=int, default=32768)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--window", type=int, default=8192)
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--intermediate", type=int, default=8960)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.device != "cuda":
        torch.cuda.synchronize = lambda: None  # CPU smoke run of the script

    with tempfile.TemporaryDirectory() as folder:
        plan = build_and_export(folder, args)
        ids = torch.randint(3, 250, (1, args.prompt), device=args.device)
        rows = []
        for label, remote in (("dense (plain model)", False), ("sparse (exported RTPurbo)", True)):
            model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote, dtype=torch.bfloat16)
            model = model.to(args.device).eval()
            with torch.no_grad():
                one = statistics.median(timed_generate(model, ids, 1) for _ in range(3))
                many = statistics.median(timed_generate(model, ids, args.new) for _ in range(3))
            per_token = (many - one) / (args.new - 1)
            rows.append((label, one * 1000, per_token * 1000, 1.0 / per_token))
            print(f"{label}: prefill+1 {one * 1000:.1f} ms, decode {per_token * 1000:.2f} ms/token "
                  f"({1.0 / per_token:.1f} tokens/s)", flush=True)
            del model
            torch.cuda.empty_cache() if args.device == "cuda" else None
    kv = plan.kv_cache_fraction(args.prompt)
    lines = [f"# Decode, exported sparse model vs dense: Qwen2-1.5B shape (random weights), prompt {args.prompt}", "",
             f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; device: "
             f"{torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}; torch {torch.__version__}",
             f"- command: `python benchmarks/bench_decode.py {' '.join(argv or sys.argv[1:])}`",
             f"- plan: 15% retrieval KV heads, window {args.window}, sink 4, top-p 0.9; bf16; greedy; batch 1; "
             f"KV cache of the sparse model = {kv:.3f} of dense at {args.prompt} tokens", "",
             "| model | prompt + 1 token (ms) | decode (ms/token) | tokens/s |", "| --- | --- | --- | --- |"]
    lines += [f"| {label} | {a:.1f} | {b:.2f} | {c:.1f} |" for label, a, b, c in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        open(args.out, "w").write(text)


if __name__ == "__main__":
    main()
