"""`evaluate`: dense vs sparse attention on the same inputs -> report.md, metrics.json, plots/*.png
(and TensorBoard through the trainer's monitor)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from .. import distributed as dist
from ..plan import SparsityPlan
from .data_parallel import gather_by_length, gather_needles, gather_perplexity
from .intervals import paired_ratio_interval, wilson_interval
from .kv_cache import kv_cache_bytes
from .needle_prompts import build_needle_prompts
from .passes import SCORING, measure_perplexity, perplexity_documents, prefill_times, score_needles
from .perplexity import BucketedPerplexity
from .plots import evaluation_figures, save_figures
from .prefill_timing import default_warmup, device_label
from .report import render_report

TEXTS_SCANNED_PER_DOC = 25  # held-out texts read per wanted perplexity document before giving up


def evaluate(model, tokenizer, runtime, plan: SparsityPlan, *, lengths: Sequence[int], depths: Sequence[float],
             samples_per_cell: int, perplexity_texts: Optional[Iterable[str]], perplexity_len: int, out_dir,
             seed: int = 0, monitor=None, perplexity_docs: int = 4, perplexity_buckets: int = 8,
             timing_runs: int = 3, tasks: Sequence[str] = ("passkey",), scoring: str = "teacher_forced",
             haystack_texts: Optional[Sequence[str]] = None, text_sources: Optional[dict[str, str]] = None,
             global_step: int = 0, progress: bool = True) -> dict:
    """Evaluate `model` (with `runtime = attach_sparsity(model, plan)`) dense and sparse.

    - Needle grid: `samples_per_cell` synthetic prompts (`tasks`, rtpurbo_train.synthetic) per
      (length in `lengths`, depth in `depths`), each scored by greedy exact match of its answer in both
      modes. One forward per prompt and mode: greedy decoding reproduces the answer iff at every answer
      position the argmax equals the next answer token given the correct prefix (teacher forcing;
      proof and the caveat for block-level selection in `needle_scoring`). `scoring="greedy_decode"`
      decodes the sparse answers token by token instead.
    - Perplexity by position: the first `perplexity_docs` texts of `perplexity_texts` with at least
      `perplexity_len` tokens, cut to that length; `perplexity_buckets` position buckets. None skips it.
    - Sparsity and attention recall per layer at each length (from `runtime.measuring()` during the
      sparse needle forwards), KV-cache bytes dense vs sparse (from the plan, in the model's dtype),
      prefill time dense vs sparse per length (median of `timing_runs`, first prompt of each length).

    - `haystack_texts`: the text the needles are hidden in (None: the generated filler sentences).
      `text_sources`: {"perplexity": ..., "haystack": ...}, how the report names the texts (a default
      is written when missing).

    Several ranks deal the prompts, the documents and the timed lengths among themselves and gather the
    results (`data_parallel.py`; a ZeRO-3-partitioned model: every rank runs every forward). Rank 0 writes
    `out_dir/report.md`, `out_dir/metrics.json`, `out_dir/plots/*.png` and logs to `monitor` (scalars under
    `eval/`, at `global_step`). Returns the results dict (the content of metrics.json) on every rank. The
    model's train/eval mode and the runtime's settings are restored afterwards.
    """
    lengths, depths = [int(n) for n in lengths], [float(d) for d in depths]
    _check_arguments(lengths, depths, samples_per_cell, perplexity_len, perplexity_docs, perplexity_buckets,
                     timing_runs, scoring)
    base = _base_model(model)
    plan.check_model(base.config)
    out_dir = Path(out_dir)
    device = next(model.parameters()).device
    dtype = getattr(base, "dtype", None) or next(model.parameters()).dtype  # the KV cache's dtype
    was_training = model.training
    share = dist.forward_share(model)
    model.eval()
    try:
        prompts = build_needle_prompts(tokenizer, lengths, depths, samples_per_cell, seed, tasks, haystack_texts)
        records, attention_by_length = score_needles(model, runtime, dist.deal(prompts, share), device,
                                                     scoring=scoring, progress=progress)
        records, attention_by_length = gather_needles(records, attention_by_length, share, len(prompts))
        perplexity = _perplexity(model, tokenizer, runtime, perplexity_texts, perplexity_len, perplexity_docs,
                                 perplexity_buckets, device, progress, share)
        first_prompt = {}
        for p in prompts:
            first_prompt.setdefault(p.length, torch.tensor([list(p.prompt_ids)], dtype=torch.long))
        timed = prefill_times(model, runtime, dict(dist.deal(list(first_prompt.items()), share)), device, timing_runs)
        prefill = gather_by_length(timed, share, lengths)
    finally:
        model.train(was_training)

    text = {"perplexity": "the given texts" if perplexity_texts is not None else "none",
            "haystack": "the given haystack texts" if haystack_texts is not None else "generated filler sentences",
            **(text_sources or {})}
    results = {
        "config": {"lengths": lengths, "depths": depths, "samples_per_cell": samples_per_cell, "seed": seed,
                   "tasks": list(tasks), "scoring": scoring, "perplexity_len": perplexity_len,
                   "perplexity_docs": perplexity_docs, "perplexity_buckets": perplexity_buckets,
                   "timing_runs": timing_runs, "text": text},
        "device": device_label(device),
        "dtype": str(dtype).replace("torch.", ""),
        "needle": needle_summary(records, lengths, depths, scoring),
        "perplexity": perplexity,
        "attention": {"by_length": {str(n): attention_by_length[n] for n in lengths if n in attention_by_length}},
        "kv_cache": {"dtype": str(dtype).replace("torch.", ""),
                     "by_length": {str(n): kv_cache_bytes(plan, n, dtype) for n in lengths}},
        "prefill": {"device": device_label(device), "backend": getattr(runtime, "backend", "?"), "runs": timing_runs,
                    "warmup": default_warmup(device), "by_length": {str(n): row for n, row in prefill.items()}},
        "plan": {"num_layers": plan.model.num_layers, "summary": plan.summary(),
                 "settings": plan.model_dump(exclude={"layers"})},
    }
    results["scalars"] = scalar_metrics(results)
    if dist.is_main():
        _write_outputs(results, plan, out_dir, monitor, global_step)
    return results


def _check_arguments(lengths, depths, samples_per_cell, perplexity_len, perplexity_docs, perplexity_buckets,
                     timing_runs, scoring) -> None:
    if not lengths or any(n <= 0 for n in lengths):
        raise ValueError(f"lengths must be a non-empty list of positive token counts, got {lengths}")
    if len(set(lengths)) != len(lengths):
        raise ValueError(f"lengths must be distinct, got {lengths}")
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"depths must be a non-empty list of values in [0, 1], got {depths}")
    for name, value, low in (("samples_per_cell", samples_per_cell, 1), ("perplexity_len", perplexity_len, 2),
                             ("perplexity_docs", perplexity_docs, 1), ("perplexity_buckets", perplexity_buckets, 1),
                             ("timing_runs", timing_runs, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if scoring not in SCORING:
        raise ValueError(f"scoring must be one of {SCORING}, got {scoring!r}")


def _base_model(model):
    """The transformers model under a peft wrapper (its config and dtype are the model's)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _perplexity(model, tokenizer, runtime, texts, seq_len, max_docs, buckets, device, progress, share) -> dict:
    if texts is None:
        return {"skipped": "no held-out texts were given"}
    docs, scanned = perplexity_documents(tokenizer, texts, seq_len, max_docs, TEXTS_SCANNED_PER_DOC * max_docs)
    if not docs:
        reason = (f"none of the {scanned} held-out texts read has {seq_len} tokens "
                  "(lower perplexity_len or give longer documents)")
        if dist.is_main():
            print(f"[rtpurbo] evaluation: perplexity skipped: {reason}", flush=True)
        return {"skipped": reason}
    mine = dist.deal(docs, share)
    if mine:
        stats = measure_perplexity(model, runtime, mine, buckets, device, progress=progress)
    else:  # more ranks than documents
        stats = {name: BucketedPerplexity(seq_len, buckets) for name in ("dense", "sparse")}
    stats = gather_perplexity(stats, share)
    dense, sparse = stats["dense"], stats["sparse"]
    rows = [{"start": d.start, "end": d.end, "tokens": d.tokens, "dense_ppl": d.perplexity,
             "sparse_ppl": s.perplexity, "rel_increase": s.perplexity / d.perplexity - 1.0}
            for d, s in zip(dense.buckets, sparse.buckets)]
    return {"seq_len": seq_len, "docs": len(docs), "texts_read": scanned, "dense": dense.perplexity,
            "sparse": sparse.perplexity, "rel_increase": sparse.perplexity / dense.perplexity - 1.0, "buckets": rows}


def _mean(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else float("nan")


def _accuracies(records: list[dict]) -> dict:
    """Dense and sparse accuracy of `records` with 95% intervals (Wilson each; paired bootstrap for the ratio)."""
    dense, sparse = [bool(r["dense"]) for r in records], [bool(r["sparse"]) for r in records]
    d, s = _mean(dense), _mean(sparse)
    return {"dense": d, "sparse": s, "prompts": len(records),
            "sparse_over_dense": s / d if d > 0 else float("nan"),
            "dense_ci": list(wilson_interval(sum(dense), len(dense))),
            "sparse_ci": list(wilson_interval(sum(sparse), len(sparse))),
            "ratio_ci": list(paired_ratio_interval(dense, sparse))}


def needle_summary(records: list[dict], lengths: list[int], depths: list[float], scoring: str) -> dict:
    """Accuracy per (depth, length) cell, per length, per depth, per task and overall, dense and sparse, with
    95% confidence intervals (intervals.py).

    grid[mode][r][c] is the accuracy at depths[r], lengths[c] (NaN for an empty cell)."""
    def cell(mode, length, depth):
        return _mean([r[mode] for r in records if r["length"] == length and r["depth"] == depth])

    grid = {mode: [[cell(mode, n, d) for n in lengths] for d in depths] for mode in ("dense", "sparse")}
    by_length = {str(n): _accuracies([r for r in records if r["length"] == n]) for n in lengths}
    by_depth = {f"{d:g}": _accuracies([r for r in records if r["depth"] == d]) for d in depths}
    tasks = sorted({r["task"] for r in records})
    by_task = {t: _accuracies([r for r in records if r["task"] == t]) for t in tasks}
    overall = _accuracies(records)
    return {"scoring": scoring, "prompts_scored": len(records), **{k: v for k, v in overall.items() if k != "prompts"},
            "grid": grid, "by_length": by_length, "by_depth": by_depth, "by_task": by_task, "prompts": records}


def scalar_metrics(results: dict) -> dict[str, float]:
    """The flat `eval/...` scalars logged to TensorBoard (NaN values are left out)."""
    out = {}
    needle = results["needle"]
    for mode in ("dense", "sparse"):
        out[f"eval/needle/{mode}"] = needle[mode]
        for n, row in needle["by_length"].items():
            out[f"eval/needle/{mode}/len{n}"] = row[mode]
    out["eval/needle/sparse_over_dense"] = needle["sparse_over_dense"]
    ppl = results["perplexity"]
    if "skipped" not in ppl:
        out.update({"eval/ppl/dense": ppl["dense"], "eval/ppl/sparse": ppl["sparse"],
                    "eval/ppl/rel_increase": ppl["rel_increase"]})
    for n, metrics in results["attention"]["by_length"].items():
        for key in ("sparsity/mean", "sparsity/streaming/mean", "sparsity/retrieval/mean", "recall/mean",
                    "recall/retrieval/mean"):
            if key in metrics:
                out[f"eval/{key}/len{n}"] = metrics[key]
    for n, row in results["kv_cache"]["by_length"].items():
        out[f"eval/kv_fraction/len{n}"] = row["fraction"]
    for n, row in results["prefill"]["by_length"].items():
        out[f"eval/prefill_ms/dense/len{n}"] = 1000.0 * row["dense_s"]
        out[f"eval/prefill_ms/sparse/len{n}"] = 1000.0 * row["sparse_s"]
        out[f"eval/prefill_speedup/len{n}"] = row["speedup"]
    return {k: float(v) for k, v in out.items() if v is not None and not math.isnan(float(v))}


def _json_safe(value):
    """NaN/inf -> None (strict JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _write_outputs(results: dict, plan: SparsityPlan, out_dir: Path, monitor, global_step: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    figs = evaluation_figures(results, plan)
    paths = save_figures(figs, out_dir / "plots", monitor, global_step)
    results["plots"] = [str(p.relative_to(out_dir)) for p in paths]
    (out_dir / "report.md").write_text(render_report(results))
    tmp = out_dir / "metrics.json.tmp"
    tmp.write_text(json.dumps(_json_safe(results), indent=1, allow_nan=False))
    tmp.replace(out_dir / "metrics.json")
    if monitor is not None:
        monitor.log("evaluate", global_step, global_step, results["scalars"])
