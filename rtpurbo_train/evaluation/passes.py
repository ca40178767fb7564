"""The forward passes of the evaluation, each run dense and sparse on the same inputs: needle prompts
(accuracy + sparsity/recall metrics), held-out documents (perplexity by position), prefill timing.

Every forward is a whole sequence without KV cache (the training-time sparse model has none).
"""
from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from typing import Iterable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from .. import distributed as dist
from .needle_scoring import NeedlePrompt, greedy_decode_match, greedy_exact_match
from .perplexity import BucketedPerplexity, token_nll
from .prefill_timing import median_seconds, time_forward

SCORING = ("teacher_forced", "greedy_decode")


@contextmanager
def attention_mode(runtime, mode: str, measure: bool = False):
    """Run forwards in `mode` ('full' or 'sparse'), recording sparsity/recall metrics iff `measure`,
    and never the indexer KL (a training loss). Restores the runtime's settings afterwards, since the
    trainer may call the evaluation between steps."""
    saved = (runtime.mode, runtime.indexer_kl, runtime.measure)
    runtime.set_mode(mode)
    runtime.indexer_kl, runtime.measure = False, measure
    try:
        yield runtime
    finally:
        runtime.mode, runtime.indexer_kl, runtime.measure = saved


def model_logits(model, input_ids: torch.Tensor, device: torch.device, keep: Optional[int] = None) -> torch.Tensor:
    """input_ids [1, T] -> logits [1, T, V] (or [1, keep, V], the last `keep` positions)."""
    kwargs = {"use_cache": False}
    if keep is not None:
        kwargs["logits_to_keep"] = keep
    return model(input_ids=input_ids.to(device), **kwargs).logits


def _progress(total: int, desc: str, enabled: bool):
    return tqdm(total=total, desc=desc, disable=not (enabled and dist.is_main()), dynamic_ncols=True, leave=False)


@torch.no_grad()
def score_needles(model, runtime, prompts: Sequence[NeedlePrompt], device: torch.device, *,
                  scoring: str = "teacher_forced", progress: bool = True) -> tuple[list[dict], dict[int, dict[str, float]]]:
    """Score every prompt dense and sparse.

    Dense: one teacher-forced forward (exactly greedy decoding, see `needle_scoring`). Sparse: one
    teacher-forced forward with sparsity/recall measured; with scoring='greedy_decode' the match is
    then decided by token-by-token decoding instead.
    Returns (one record per prompt: length, depth, task, answer_tokens, dense, sparse;
    per length: the runtime metrics averaged over that length's prompts).
    """
    if scoring not in SCORING:
        raise ValueError(f"scoring must be one of {SCORING}, got {scoring!r}")
    records, metric_sums = [], defaultdict(lambda: defaultdict(float))
    counts: dict[int, int] = defaultdict(int)
    with _progress(len(prompts), "needle prompts", progress) as bar:
        for prompt in prompts:
            ids, keep = prompt.input_ids(), len(prompt.answer_ids) + 1
            with attention_mode(runtime, "full"):
                dense = greedy_exact_match(model_logits(model, ids, device, keep), prompt)
            with attention_mode(runtime, "sparse", measure=True):
                runtime.pop_metrics()  # drop anything a previous forward left
                sparse_logits = model_logits(model, ids, device, keep)
                metrics = runtime.pop_metrics()
            if scoring == "greedy_decode":
                with attention_mode(runtime, "sparse"):
                    sparse = greedy_decode_match(lambda x: model_logits(model, x, device, 1), prompt)
            else:
                sparse = greedy_exact_match(sparse_logits, prompt)
            records.append({"length": prompt.length, "depth": prompt.depth, "task": prompt.task,
                            "tokens": ids.shape[1], "answer_tokens": len(prompt.answer_ids),
                            "dense": dense, "sparse": sparse})
            for key, value in metrics.items():
                metric_sums[prompt.length][key] += value
            counts[prompt.length] += 1
            bar.update(1)
    by_length = {n: {k: v / counts[n] for k, v in sums.items()} for n, sums in metric_sums.items()}
    return records, by_length


def perplexity_documents(tokenizer, texts: Iterable[str], seq_len: int, max_docs: int,
                         scan_limit: int) -> tuple[list[list[int]], int]:
    """The first `max_docs` texts with at least `seq_len` tokens, cut to their first `seq_len` tokens.

    Shorter texts are skipped (not packed: a position bucket must mean the position in one document).
    At most `scan_limit` texts are read. Returns (documents, texts read).
    """
    docs, scanned = [], 0
    for text in texts:
        if len(docs) >= max_docs or scanned >= scan_limit:
            break
        scanned += 1
        if not isinstance(text, str) or not text:
            continue
        ids = tokenizer(text)["input_ids"]
        if len(ids) >= seq_len:
            docs.append(ids[:seq_len])
    return docs, scanned


@torch.no_grad()
def measure_perplexity(model, runtime, docs: Sequence[Sequence[int]], num_buckets: int, device: torch.device, *,
                       progress: bool = True) -> dict[str, BucketedPerplexity]:
    """Dense and sparse NLL of every document, by position bucket. docs: equal-length token lists."""
    seq_len = len(docs[0])
    out = {"dense": BucketedPerplexity(seq_len, num_buckets), "sparse": BucketedPerplexity(seq_len, num_buckets)}
    with _progress(len(docs), "perplexity documents", progress) as bar:
        for doc in docs:
            ids = torch.tensor([list(doc)], dtype=torch.long)
            for name, mode in (("dense", "full"), ("sparse", "sparse")):
                with attention_mode(runtime, mode):
                    out[name].add(token_nll(model_logits(model, ids, device), ids))
            bar.update(1)
    return out


@torch.no_grad()
def prefill_times(model, runtime, inputs: dict[int, torch.Tensor], device: torch.device, runs: int) -> dict[int, dict]:
    """Per length: median seconds of a dense and of a sparse forward over `inputs[length]` [1, T]
    (one logit kept, so the LM head does not dominate at large vocabularies)."""
    out = {}
    for length, ids in inputs.items():
        ids = ids.to(device)
        row = {"tokens": ids.shape[1]}
        for name, mode in (("dense", "full"), ("sparse", "sparse")):
            with attention_mode(runtime, mode):
                times = time_forward(lambda: model_logits(model, ids, device, 1), device, runs)
            row[f"{name}_s"] = median_seconds(times)
            row[f"{name}_runs_s"] = times
        row["speedup"] = row["dense_s"] / row["sparse_s"] if row["sparse_s"] > 0 else float("nan")
        out[length] = row
    return out
