"""Needle-echo documents for retrieval-head calibration (METHOD.md, RTPurbo step 1).

A document is a haystack window with the same needle span written twice: once near the start
(`first_depth`) and once near the end (`second_depth`). A head that retrieves by content makes the
second copy's tokens attend to the first copy; a local or streaming head cannot.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass(frozen=True)
class EchoDocument:
    """One calibration document.

    input_ids: LongTensor [T], the token ids (prefix + haystack window with the two needle copies).
    needle_1:  (start, end) half-open token range of the first copy.
    needle_2:  (start, end) half-open token range of the second copy; same length, after needle_1.
    """

    input_ids: torch.Tensor
    needle_1: tuple[int, int]
    needle_2: tuple[int, int]

    def __post_init__(self):
        ids = self.input_ids
        if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.dtype != torch.long:
            raise ValueError("EchoDocument.input_ids must be a 1-D LongTensor [T]")
        (s1, e1), (s2, e2) = self.needle_1, self.needle_2
        if not (0 <= s1 < e1 <= s2 < e2 <= ids.numel()):
            raise ValueError(f"needle spans {self.needle_1}, {self.needle_2} must satisfy "
                             f"0 <= s1 < e1 <= s2 < e2 <= T={ids.numel()}")
        if e1 - s1 != e2 - s2:
            raise ValueError(f"needle copies have different lengths: {self.needle_1} vs {self.needle_2}")

    @property
    def length(self) -> int:
        return self.input_ids.numel()

    @property
    def needle_len(self) -> int:
        return self.needle_1[1] - self.needle_1[0]


def make_echo_documents(
    haystack_ids: Sequence[int] | torch.Tensor,
    *,
    lengths: Sequence[int],
    docs_per_length: int,
    needle_len: int = 32,
    first_depth: float = 0.1,
    second_depth: float = 0.9,
    seed: int = 0,
    needle_id_range: Optional[tuple[int, int]] = None,
    prefix_ids: Sequence[int] = (),
) -> list[EchoDocument]:
    """Build `docs_per_length` needle-echo documents for each length in `lengths`.

    Each document is `prefix_ids` (e.g. the BOS token) followed by a random contiguous window of
    `haystack_ids`, `length` tokens in all. The needle is written over the window at
    `round(first_depth * length)` and again at `round(second_depth * length)` (moved left if it
    would run past the end).

    The needle is `needle_len` token ids drawn uniformly at random (with replacement) from the
    distinct ids of the haystack, or from `needle_id_range = (lo, hi)` (half-open) when given.
    Why random ids rather than a span of the haystack: a random sequence cannot be predicted from the
    language around it, so the second copy can only find the first copy by content (copy / induction
    retrieval), which is what a retrieval head must do; a natural-text span would also reward heads
    that attend to related text, and could occur elsewhere in the haystack. Drawing from the
    haystack's own ids keeps the needle in the model's usual distribution (no special tokens, no
    never-trained embeddings).

    Returns documents ordered by length, then by index. Deterministic in `seed`.
    """
    hay = torch.as_tensor(haystack_ids, dtype=torch.long).flatten()
    prefix = torch.as_tensor(list(prefix_ids), dtype=torch.long)
    if hay.numel() == 0:
        raise ValueError("haystack_ids is empty")
    if not lengths or any(int(n) <= 0 for n in lengths):
        raise ValueError(f"lengths must be a non-empty list of positive ints, got {list(lengths)}")
    if docs_per_length < 1:
        raise ValueError(f"docs_per_length must be >= 1, got {docs_per_length}")
    if needle_len < 1:
        raise ValueError(f"needle_len must be >= 1, got {needle_len}")
    if not 0.0 <= first_depth < second_depth <= 1.0:
        raise ValueError(f"need 0 <= first_depth < second_depth <= 1, got {first_depth}, {second_depth}")

    if needle_id_range is None:
        pool = torch.unique(hay)
    else:
        lo, hi = needle_id_range
        if not 0 <= lo < hi:
            raise ValueError(f"needle_id_range must be (lo, hi) with 0 <= lo < hi, got {needle_id_range}")
        pool = torch.arange(lo, hi, dtype=torch.long)

    gen = torch.Generator().manual_seed(seed)
    docs: list[EchoDocument] = []
    for length in (int(n) for n in lengths):
        body = length - prefix.numel()
        if body > hay.numel():
            raise ValueError(f"haystack has {hay.numel()} tokens; a document of length {length} needs "
                             f"{body} (generate or load more haystack text)")
        s1 = max(round(first_depth * length), prefix.numel())
        s2 = min(round(second_depth * length), length - needle_len)
        if s1 + needle_len > s2:
            raise ValueError(f"length {length} is too short for two non-overlapping needles of {needle_len} "
                             f"tokens at depths {first_depth} and {second_depth} after a {prefix.numel()}-token prefix")
        for _ in range(docs_per_length):
            start = int(torch.randint(0, hay.numel() - body + 1, (1,), generator=gen))
            needle = pool[torch.randint(0, pool.numel(), (needle_len,), generator=gen)]
            ids = torch.cat([prefix, hay[start:start + body]])
            ids[s1:s1 + needle_len] = needle
            ids[s2:s2 + needle_len] = needle
            docs.append(EchoDocument(ids, (s1, s1 + needle_len), (s2, s2 + needle_len)))
    return docs
