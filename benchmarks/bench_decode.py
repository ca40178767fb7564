"""Decode speed of the exported sparse model vs the plain (dense) model, on one GPU.

    python benchmarks/bench_decode.py --prompt 32768 --new 64 --out decode.md
    python benchmarks/bench_decode.py --shape smollm2-135m --prompt 8192 --new 64

Builds a random-weight model of the chosen shape: `qwen2-1.5b` (default; 28 layers, hidden 1536, 12 query /
2 KV heads, head dim 128, window 8192) or `smollm2-135m` (Llama, 30 layers, hidden 576, 9 query / 3 KV heads,
head dim 64, vocab 49152, rope theta 1e5, tied embeddings, window 1024 as in the rtpurbo_300step recipe);
--layers/--hidden/... override single fields (e.g. a tiny CPU smoke run: --device cpu --layers 2 --hidden 128
--intermediate 256 --heads 4 --kv-heads 2 --head-dim 32 --prompt 256 --new 4 --window 64). A plan with the
top 15% of KV heads by random scores (sink 4, top-p 0.9), exports it (bf16), then loads the folder twice:
plain (`trust_remote_code=False`, dense attention and transformers' DynamicCache) and sparse
(`trust_remote_code=True`, streaming heads keep sink + window).
Decode time per token = (generate(prompt, new) - generate(prompt, 1)) / (new - 1), greedy, CUDA-synced
wall clock, median of 3. Also the KV-cache fraction of the plan, and (CUDA) whether one decode step makes the
host wait for the device: a step after a warm-up step runs under `torch.cuda.set_sync_debug_mode("error")`,
with the all-ones attention mask generate() passes.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from export_shapes import LABELS, SHAPES, add_shape_arguments, apply_shape_defaults, build_and_export
from result_file import emit, provenance


def timed_generate(model, ids, new):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=True)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def decode_step_sync(model, ids) -> str:
    """"none", or the first host<->device synchronisation of one decode step (CUDA's sync debug mode)."""
    if not ids.is_cuda:
        return "n/a (cpu)"
    def ones(length):
        return torch.ones(1, length, dtype=torch.long, device=ids.device)

    n = ids.shape[1]
    with torch.no_grad():
        cache = model(ids, attention_mask=ones(n), use_cache=True, logits_to_keep=1).past_key_values
        model(ids[:, -1:], attention_mask=ones(n + 1), past_key_values=cache, logits_to_keep=1)  # warm-up step
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(ids[:, -1:], attention_mask=ones(n + 2), past_key_values=cache, logits_to_keep=1)
            torch.cuda.set_sync_debug_mode("default")
            return "none"
        except RuntimeError as err:
            torch.cuda.set_sync_debug_mode("default")
            return str(err).strip().splitlines()[0][:80]


def main(argv=None):
    from transformers import AutoModelForCausalLM

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen2-1.5b",
                   help="model shape (random weights); the options below default to its values")
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens (qwen2-1.5b 32768, smollm2-135m 8192)")
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--window", type=int, default=None, help="streaming window (qwen2-1.5b 8192, smollm2-135m 1024)")
    add_shape_arguments(p)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    apply_shape_defaults(args)
    if args.device != "cuda":
        torch.cuda.synchronize = lambda: None  # CPU smoke run of the script

    with tempfile.TemporaryDirectory() as folder:
        plan = build_and_export(folder, args, max_len=args.prompt + args.new)
        ids = torch.randint(3, 250, (1, args.prompt), device=args.device)
        rows = []
        for label, remote in (("dense (plain model)", False), ("sparse (exported RTPurbo)", True)):
            model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote, dtype=torch.bfloat16)
            model = model.to(args.device).eval()
            with torch.no_grad():
                one = statistics.median(timed_generate(model, ids, 1) for _ in range(3))
                many = statistics.median(timed_generate(model, ids, args.new) for _ in range(3))
            per_token = (many - one) / (args.new - 1)
            sync = decode_step_sync(model, ids)
            rows.append((label, one * 1000, per_token * 1000, 1.0 / per_token, sync))
            print(f"{label}: prefill+1 {one * 1000:.1f} ms, decode {per_token * 1000:.2f} ms/token "
                  f"({1.0 / per_token:.1f} tokens/s); host sync in a decode step: {sync}", flush=True)
            del model
            torch.cuda.empty_cache() if args.device == "cuda" else None
    kv = plan.kv_cache_fraction(args.prompt)
    lines = [f"# Decode, exported sparse model vs dense: {LABELS[args.shape]} shape (random weights), prompt {args.prompt}",
             "", *provenance("bench_decode.py", argv),
             f"- plan: 15% retrieval KV heads, window {args.window}, sink 4, top-p 0.9; bf16; greedy; batch 1; "
             f"KV cache of the sparse model = {kv:.3f} of dense at {args.prompt} tokens", "",
             "| model | prompt + 1 token (ms) | decode (ms/token) | tokens/s | host sync in a decode step |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {label} | {a:.1f} | {b:.2f} | {c:.1f} | {sync} |" for label, a, b, c, sync in rows]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
