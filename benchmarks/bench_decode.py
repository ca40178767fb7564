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
- sparse, decode steps replayed from a CUDA graph (the default);
- sparse load with the prompt below its seqlen_threshold (as a shipped SmolLM2 at 8K: threshold 32768) and
  `cache_implementation="static"`: the dense fallback on transformers' own cache, compiled as for the plain load.
Decode time per token = (generate(prompt, new) - generate(prompt, 1)) / (new - 1) after a warm-up call of each,
greedy, every row of a batch the same length, CUDA-synced wall clock, median of --repeats. KV bytes per
sequence are measured on the caches after a prefill; the largest batch that fits is an estimate:
(GPU memory - weights - 10% headroom) / per-sequence KV bytes, without activations.
--check-tokens N: on one loaded sparse model, batch 1, the kernel + graph path vs the PyTorch path (backend
"torch", eager): prefill last-position logits (relative L2 error, argmax), then N greedy tokens with a PyTorch
prefill and decode steps alone compared (tokens identical, step-logit error), then the whole path.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from export_shapes import (LABELS, SHAPES, add_shape_arguments, apply_shape_defaults, build_and_export, export_pretrained,
                           set_threshold)
from result_file import emit, provenance

ROWS = (("dense, plain load (DynamicCache)", False, {}),
        ("dense, plain load, static cache + torch.compile", False, {"cache_implementation": "static"}),
        ("sparse, eager decode steps", True, {"cuda_graphs": False}),
        ("sparse, CUDA-graph decode steps", True, {"cuda_graphs": True}),
        ("sparse load, prompt below seqlen_threshold (dense fallback), static cache + torch.compile", True,
         {"cache_implementation": "static", "dense_fallback": True}))


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
        if options.get("dense_fallback"):
            set_threshold(model, 2**31 - 1)  # every prompt below it: the plain model's path on a stock cache
    return model


def time_row(model, ids, new, repeats, gen_kwargs):
    # Warm-up at both timed lengths: kernels compile and graphs record, and a static cache is sized prompt +
    # max_new_tokens, so torch.compile compiles the timed shape here and not inside the first timed call.
    timed_generate(model, ids, 1, **gen_kwargs)
    timed_generate(model, ids, new, **gen_kwargs)
    one = statistics.median(timed_generate(model, ids, 1, **gen_kwargs) for _ in range(repeats))
    many = statistics.median(timed_generate(model, ids, new, **gen_kwargs) for _ in range(repeats))
    return one, (many - one) / (new - 1)


def largest_batch(per_sequence: int, weights: int, device) -> str:
    if device != "cuda":
        return "n/a"
    free = torch.cuda.get_device_properties(0).total_memory * 0.9 - weights
    return str(int(free // per_sequence))


def check_tokens(folder, device, prompt, new) -> list[str]:
    """Kernel + graph path vs PyTorch path of one loaded sparse model: prefill, decode alone, whole path."""
    ids = torch.randint(3, 250, (1, prompt), device=device, generator=torch.Generator(device).manual_seed(1))
    model = load(folder, True, device, {"cuda_graphs": True})
    opts = model.rtpurbo_options

    def rel(a, b):
        a, b = a.float(), b.float()
        return float((a - b).norm() / b.norm())

    def greedy(prefill, decode, graphs):
        """Prefill with backend `prefill`, then new - 1 greedy steps with `decode`; tokens and step logits."""
        cache = model.make_cache(reserve=prompt + new)
        opts.backend, opts.cuda_graphs = prefill, graphs
        logits = model(ids, past_key_values=cache, logits_to_keep=1).logits
        opts.backend = decode
        tokens, steps = [], [logits[:, -1]]
        for _ in range(new - 1):
            tokens.append(logits[:, -1].argmax(-1, keepdim=True))
            logits = model(tokens[-1], past_key_values=cache, logits_to_keep=1).logits
            steps.append(logits[:, -1])
        tokens.append(logits[:, -1].argmax(-1, keepdim=True))
        return torch.cat(tokens, 1)[0], steps

    def compare(a, b):
        same = int((a[0] == b[0]).cumprod(0).sum())
        err = max(rel(x, y) for x, y in zip(a[1][:same], b[1][:same])) if same else float("nan")
        tail = " (all)" if same == new else f"; first difference at token {same}"
        return f"first {same} of {new} identical{tail}", err

    with torch.no_grad():
        first = {}
        for backend in ("auto", "torch"):
            opts.backend = backend
            cache = model.make_cache(reserve=prompt + new)
            first[backend] = model(ids, past_key_values=cache, logits_to_keep=1).logits[:, -1]
        ref = greedy("torch", "torch", False)
        decode = greedy("torch", "auto", True)
        replays = model._rtpurbo_graphs.replays
        whole = greedy("auto", "auto", True)
    agree = bool((first["auto"].argmax(-1) == first["torch"].argmax(-1)).all())
    decode_same, decode_err = compare(decode, ref)
    whole_same, _ = compare(whole, ref)
    head = f"{prompt}-token prompt, {new} new tokens, greedy, kernel + graph path vs PyTorch path"
    return [f"- {head} (backend \"torch\", eager), one loaded model:",
            f"- prefill: last-position logits relative L2 error {rel(first['auto'], first['torch']):.2e}; "
            f"argmax {'agrees' if agree else 'differs'}",
            f"- decode alone (both prefill with PyTorch): {decode_same}; max step-logit relative L2 error while "
            f"identical {decode_err:.2e}; {replays} of {new - 1} decode steps were CUDA-graph replays",
            f"- whole path (kernel prefill too): {whole_same}"]


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
