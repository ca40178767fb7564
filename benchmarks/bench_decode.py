"""Decode speed of the exported sparse model vs the plain (dense) model, on one GPU, as a user runs them.

    python benchmarks/bench_decode.py --prompts 32768 131072 --batches 1 8 --out decode.md
    python benchmarks/bench_decode.py --shape smollm2-135m --prompts 8192 --batches 1
    python benchmarks/bench_decode.py --model smollm2-135m --prompts 8192 --check-tokens 64

Builds a random-weight model of the chosen shape: `qwen2-1.5b` (default; 28 layers, hidden 1536, 12 query /
2 KV heads, head dim 128, window 8192) or `smollm2-135m` (Llama, 30 layers, hidden 576, 9 query / 3 KV heads,
head dim 64, vocab 49152, window 1024 as in the rtpurbo_300step recipe), or `--model NAME` real weights
(rtpurbo_train.models.load_model); --layers/--hidden/... override single fields (a tiny CPU smoke run:
--device cpu --layers 2 --hidden 128 --intermediate 256 --heads 4 --kv-heads 2 --head-dim 32 --prompts 256
--new 4 --window 64). A plan with the top 15% of KV heads by random scores (sink 4, top-p 0.9), exported
(bf16); the folder is then loaded as a user would and timed with `generate()`, side by side:
- dense, plain load (`trust_remote_code=False`): transformers' default DynamicCache;
- dense, plain load with `cache_implementation="static"` (transformers then compiles the decode step with
  torch.compile; the first call, which compiles, is not timed);
- sparse (`trust_remote_code=True`), decode steps eager (`model.rtpurbo_options.cuda_graphs = False`);
- sparse, decode steps replayed from a CUDA graph (the default).
Decode time per token = (generate(prompt, new) - generate(prompt, 1)) / (new - 1) after one warm-up call,
greedy, every row of a batch the same length, CUDA-synced wall clock, median of --repeats. KV bytes per
sequence are measured on the caches after a prefill; the largest batch that fits is an estimate:
(GPU memory - weights - 10% headroom) / per-sequence KV bytes, without activations.
--check-tokens N: greedy tokens of N new tokens from the sparse graph + kernel path vs the sparse PyTorch
path (backend "torch", eager), batch 1.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from export_shapes import LABELS, SHAPES, add_shape_arguments, apply_shape_defaults, build_and_export, export_pretrained
from result_file import emit, provenance

ROWS = (("dense, plain load (DynamicCache)", False, {}),
        ("dense, plain load, static cache + torch.compile", False, {"cache_implementation": "static"}),
        ("sparse, eager decode steps", True, {"cuda_graphs": False}),
        ("sparse, CUDA-graph decode steps", True, {"cuda_graphs": True}))


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed_generate(model, ids, new, **kwargs) -> float:
    sync(ids.device.type)
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=True, **kwargs)
    sync(ids.device.type)
    return time.perf_counter() - t0


def kv_bytes_per_sequence(model, ids, sparse: bool) -> int:
    """Bytes the KV cache holds for one sequence after prefilling ids [1, T] (sparse: live KV + indexer state)."""
    with torch.no_grad():
        cache = model(ids[:1], use_cache=True, logits_to_keep=1).past_key_values
    if sparse:
        return cache.kv_bytes() + cache.indexer_bytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def load(folder, sparse: bool, device, options: dict):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=sparse, dtype=torch.bfloat16)
    model = model.to(device).eval()
    if sparse:
        model.rtpurbo_options.cuda_graphs = options.get("cuda_graphs", True)
    return model


def time_row(model, ids, new, repeats, gen_kwargs):
    timed_generate(model, ids, 4, **gen_kwargs)  # warm-up: kernels compile, torch.compile runs, graphs record
    one = statistics.median(timed_generate(model, ids, 1, **gen_kwargs) for _ in range(repeats))
    many = statistics.median(timed_generate(model, ids, new, **gen_kwargs) for _ in range(repeats))
    return one, (many - one) / (new - 1)


def largest_batch(per_sequence: int, weights: int, device) -> str:
    if device != "cuda":
        return "n/a"
    free = torch.cuda.get_device_properties(0).total_memory * 0.9 - weights
    return str(int(free // per_sequence))


def check_tokens(folder, device, prompt, new) -> list[str]:
    """Greedy tokens: graph + kernel path vs the PyTorch path of the same sparse folder."""
    ids = torch.randint(3, 250, (1, prompt), device=device, generator=torch.Generator(device).manual_seed(1))
    outs = {}
    for label, backend, graphs in (("kernels + CUDA graphs", "auto", True), ("PyTorch, eager", "torch", False)):
        model = load(folder, True, device, {"cuda_graphs": graphs})
        model.rtpurbo_options.backend = backend
        with torch.no_grad():
            outs[label] = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)[0, prompt:]
        del model
    a, b = outs.values()
    same = int((a == b).cumprod(0).sum())
    return [f"- greedy tokens, {new} new after a {prompt}-token prompt: kernel + graph path vs PyTorch path: "
            f"first {same} of {new} identical" + (" (all)" if same == new else f"; first difference at token {same}")]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen2-1.5b",
                   help="model shape (random weights); the options below default to its values")
    p.add_argument("--model", default=None, help="real weights instead of a random shape (e.g. smollm2-135m)")
    p.add_argument("--prompts", type=int, nargs="+", default=None, help="prompt lengths (default: the shape's)")
    p.add_argument("--batches", type=int, nargs="+", default=[1])
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--window", type=int, default=None, help="streaming window (qwen2-1.5b 8192, smollm2-135m 1024)")
    p.add_argument("--rows", type=int, nargs="+", default=list(range(len(ROWS))),
                   help="which rows to time, by index: " + "; ".join(f"{i} {r[0]}" for i, r in enumerate(ROWS)))
    p.add_argument("--check-tokens", type=int, default=0, metavar="N")
    add_shape_arguments(p)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.model:
        args.shape = args.model if args.model in SHAPES else args.shape
    apply_shape_defaults(args)
    prompts = args.prompts or [args.prompt]
    longest = max(prompts) + args.new
    title = f"{args.model} (real weights)" if args.model else f"{LABELS[args.shape]} shape (random weights)"

    lines = [f"# Decode, exported sparse model vs dense: {title}", "", *provenance("bench_decode.py", argv)]
    with tempfile.TemporaryDirectory() as folder:
        if args.model:
            plan = export_pretrained(folder, args.model, args.window)
        else:
            plan = build_and_export(folder, args, max_len=longest)
        lines += [f"- plan: 15% retrieval KV heads, window {args.window}, sink 4, top-p 0.9, block 64; bf16; greedy; "
                  f"every row of a batch the same length; {args.new} new tokens; median of {args.repeats}", ""]
        table = ["| prompt | batch | model | prompt + 1 token (ms) | decode (ms/token) | tokens/s (all rows) "
                 "| vs dense default | vs dense static+compile |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        memory = ["| prompt | KV bytes / sequence, dense | sparse (KV + indexer) | sparse / dense "
                  "| largest batch that fits, dense | sparse |", "| --- | --- | --- | --- | --- | --- |"]
        for prompt in prompts:
            per_seq = {}
            for batch in args.batches:
                ids = torch.randint(3, 250, (batch, prompt), device=args.device,
                                    generator=torch.Generator(args.device).manual_seed(0))
                speeds = {}
                for index in args.rows:
                    label, sparse, options = ROWS[index]
                    model = load(folder, sparse, args.device, options)
                    gen_kwargs = {k: v for k, v in options.items() if k == "cache_implementation"}
                    one, per_token = time_row(model, ids, args.new, args.repeats, gen_kwargs)
                    speeds[index] = batch / per_token
                    if batch == args.batches[0] and sparse not in per_seq:
                        weights = sum(t.numel() * t.element_size() for t in model.parameters())
                        per_seq[sparse] = (kv_bytes_per_sequence(model, ids, sparse), weights)
                    vs = [f"{speeds[index] / speeds[ref]:.2f}x" if ref in speeds else "-" for ref in (0, 1)]
                    table.append(f"| {prompt} | {batch} | {label} | {one * 1000:.1f} | {per_token * 1000:.2f} "
                                 f"| {speeds[index]:.1f} | {vs[0]} | {vs[1]} |")
                    print(table[-1], flush=True)
                    del model
                    if args.device == "cuda":
                        torch.cuda.empty_cache()
            if True in per_seq and False in per_seq:
                (dense, weights), (sparse, _) = per_seq[False], per_seq[True]
                memory.append(f"| {prompt} | {dense / 2**20:.1f} MiB | {sparse / 2**20:.1f} MiB | {sparse / dense:.3f} "
                              f"| {largest_batch(dense, weights, args.device)} "
                              f"| {largest_batch(sparse, weights, args.device)} |")
        lines += table + ["", f"KV cache of the plan: {plan.kv_cache_fraction(max(prompts)):.3f} of dense at "
                          f"{max(prompts)} tokens.", ""] + memory
        if args.check_tokens:
            lines += [""] + check_tokens(folder, args.device, max(prompts), args.check_tokens)
    emit(lines, args.out)


if __name__ == "__main__":
    main()
