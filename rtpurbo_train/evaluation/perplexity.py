"""Perplexity by position in the context: does sparse attention hurt late tokens (far from the sink,
beyond the window) more than early ones?

Token t of a sequence (t = 1 .. T-1) is predicted from tokens 0 .. t-1; its position is t. The
positions 1 .. T-1 are split into `num_buckets` contiguous ranges of (nearly) equal size, and each
bucket's perplexity is exp(mean NLL) over every token of every document at those positions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def position_buckets(seq_len: int, num_buckets: int) -> list[tuple[int, int]]:
    """Half-open position ranges [start, end) covering the predicted positions 1 .. seq_len - 1.

    The number of buckets is capped at seq_len - 1 (every bucket holds at least one position).
    """
    if seq_len < 2:
        raise ValueError(f"perplexity needs sequences of at least 2 tokens, got {seq_len}")
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    n = min(num_buckets, seq_len - 1)
    edges = [1 + round(b * (seq_len - 1) / n) for b in range(n + 1)]
    return [(edges[b], edges[b + 1]) for b in range(n)]


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood in float32.

    logits [B, T, V], input_ids [B, T] -> nll [B, T - 1], where nll[:, t - 1] is the NLL of token t
    (position t) given tokens < t.
    """
    if logits.shape[:2] != input_ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match input_ids {tuple(input_ids.shape)}")
    pred = logits[:, :-1].float()
    target = input_ids[:, 1:].to(pred.device)
    nll = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="none")
    return nll.view(target.shape)


@dataclass
class BucketStats:
    """Summed NLL and token count of one position bucket (sums, so documents can be added in)."""
    start: int
    end: int
    nll_sum: float = 0.0
    tokens: int = 0

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.tokens if self.tokens else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll) if self.tokens else float("nan")


class BucketedPerplexity:
    """Accumulates per-token NLL of sequences of one length into position buckets."""

    def __init__(self, seq_len: int, num_buckets: int):
        self.seq_len = seq_len
        self.buckets = [BucketStats(s, e) for s, e in position_buckets(seq_len, num_buckets)]

    def add(self, nll: torch.Tensor) -> None:
        """nll [B, seq_len - 1] from `token_nll`."""
        if nll.dim() != 2 or nll.shape[1] != self.seq_len - 1:
            raise ValueError(f"expected nll [B, {self.seq_len - 1}], got {tuple(nll.shape)}")
        nll = nll.double().cpu()
        for b in self.buckets:
            part = nll[:, b.start - 1: b.end - 1]
            b.nll_sum += float(part.sum())
            b.tokens += part.numel()

    def merge(self, other: "BucketedPerplexity") -> None:
        """Add the sums of `other` (documents of the same length measured elsewhere, e.g. on another rank)."""
        if other.seq_len != self.seq_len or len(other.buckets) != len(self.buckets):
            raise ValueError(f"cannot merge {len(other.buckets)} buckets of length {other.seq_len} into "
                             f"{len(self.buckets)} of length {self.seq_len}")
        for mine, theirs in zip(self.buckets, other.buckets):
            mine.nll_sum += theirs.nll_sum
            mine.tokens += theirs.tokens

    @property
    def tokens(self) -> int:
        return sum(b.tokens for b in self.buckets)

    @property
    def perplexity(self) -> float:
        """Over all positions: exp(total NLL / total tokens)."""
        total = sum(b.nll_sum for b in self.buckets)
        return math.exp(total / self.tokens) if self.tokens else float("nan")
