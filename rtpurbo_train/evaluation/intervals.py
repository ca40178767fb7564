"""Confidence intervals for needle accuracies: Wilson for one accuracy, a paired bootstrap for sparse / dense.

Both modes answer the same prompts, so the ratio's interval resamples prompts (keeping each prompt's dense and
sparse result together) rather than treating the two accuracies as independent.
"""
from __future__ import annotations

import math
import random
from typing import Sequence

Z95 = 1.959963984540054  # two-sided 95% normal quantile
BOOTSTRAP_SAMPLES = 2000


def wilson_interval(correct: int, total: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of an accuracy correct / total ((nan, nan) without prompts)."""
    if total <= 0:
        return float("nan"), float("nan")
    p = correct / total
    denom = 1.0 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1.0 - p) / total + z * z / (4 * total * total)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_ratio_interval(dense: Sequence[bool], sparse: Sequence[bool], *, level: float = 0.95,
                          samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of sum(sparse) / sum(dense) over prompts resampled with replacement
    (pairs kept together); resamples whose dense accuracy is 0 are left out. (nan, nan) when no resample
    has a dense hit, or without prompts. Deterministic for a seed."""
    pairs = list(zip(dense, sparse, strict=True))
    if not pairs or not any(d for d, _ in pairs):
        return float("nan"), float("nan")
    rng = random.Random(seed)
    n = len(pairs)
    ratios = []
    for _ in range(samples):
        hits_dense = hits_sparse = 0
        for _ in range(n):
            d, s = pairs[rng.randrange(n)]
            hits_dense += d
            hits_sparse += s
        if hits_dense:
            ratios.append(hits_sparse / hits_dense)
    if not ratios:
        return float("nan"), float("nan")
    ratios.sort()
    tail = (1.0 - level) / 2.0
    low = ratios[min(len(ratios) - 1, int(math.floor(tail * len(ratios))))]
    high = ratios[min(len(ratios) - 1, int(math.ceil((1.0 - tail) * len(ratios))) - 1)]
    return low, high
