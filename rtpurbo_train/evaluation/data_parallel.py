"""Gathering the evaluation's results when the ranks of a job dealt its forwards among themselves.

Every rank holds the whole model (ZeRO 0-2, or the weights reloaded after a ZeRO-3 stage), so rank r scores
prompts r, r + world, ... alone (`distributed.forward_share` / `deal`); a ZeRO-3-partitioned model needs
every rank in every forward, and then each rank runs them all, as one process would (share (0, 1)).
"""
from __future__ import annotations

from collections import Counter, defaultdict

from .. import distributed as dist
from .perplexity import BucketedPerplexity


def gather_needles(records: list[dict], by_length: dict[int, dict[str, float]], share: tuple[int, int],
                   total: int) -> tuple[list[dict], dict[int, dict[str, float]]]:
    """`score_needles`' output of every rank -> the records in prompt order and the per-length metric means
    over all prompts (each rank's means weighted by its number of prompts of that length)."""
    world = share[1]
    if world == 1:
        return records, by_length
    ordered: list = [None] * total
    sums: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    counts: Counter = Counter()
    for rank, (part, means) in enumerate(dist.all_gather_objects((records, by_length))):
        ordered[rank::world] = part
        per_length = Counter(r["length"] for r in part)
        for length, metrics in means.items():
            for key, value in metrics.items():
                sums[length][key] += value * per_length[length]
            counts[length] += per_length[length]
    return ordered, {n: {k: v / counts[n] for k, v in metrics.items()} for n, metrics in sums.items()}


def gather_perplexity(stats: dict[str, BucketedPerplexity], share: tuple[int, int]) -> dict[str, BucketedPerplexity]:
    """{'dense', 'sparse'} accumulators of every rank's documents, summed."""
    if share[1] == 1:
        return stats
    first, *others = dist.all_gather_objects(stats)
    for other in others:
        for name, acc in first.items():
            acc.merge(other[name])
    return first


def gather_by_length(rows: dict[int, dict], share: tuple[int, int], lengths: list[int]) -> dict[int, dict]:
    """Per-length rows measured on different ranks -> one dict in `lengths` order."""
    if share[1] == 1:
        return rows
    merged = {}
    for part in dist.all_gather_objects(rows):
        merged.update(part)
    return {n: merged[n] for n in lengths if n in merged}
