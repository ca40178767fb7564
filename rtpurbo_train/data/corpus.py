"""From a `DataConfig` to tokenised, filtered, split sources ready for sampling.

Each user source and the synthetic mix becomes a cached `TokenStore` (see `token_cache.py`); then
the eval hold-out and the length filters pick the training documents, and packing cuts them into
sequences (see `packing.py`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from ..errors import UserError
from ..cache import rtpurbo_cache_root
from ..synthetic import ContextTooShort, mix_example
from .config import DataConfig
from .packing import SequenceIndex, chunk_documents
from .records import SkipCounter
from .sources import ResolvedSource, iter_documents, resolve_source
from .split import is_held_out
from .token_cache import TokenStore, build_token_store

SYNTHETIC_NAME = "synthetic"
HAYSTACK_TEXT_LIMIT = 50_000_000  # characters of source text kept for synthetic haystacks


@dataclass
class PreparedSource:
    """One mixture component: its store, training documents, sequences and counters."""

    name: str
    weight: float
    store: TokenStore
    train_docs: np.ndarray  # int64, document indices in `store`
    eval_docs: int
    sequences: SequenceIndex
    skipped: dict[str, int] = field(default_factory=dict)  # content + length skips
    tail_tokens_dropped: int = 0

    def sequence_tokens(self, i: int) -> np.ndarray:
        s = self.sequences
        doc = self.store.doc(int(s.doc[i]))
        return doc[int(s.start[i]) : int(s.start[i]) + int(s.length[i])]


def resolve_cache_root(cfg: DataConfig, cache_dir: Optional[str | Path]) -> Path:
    """`data.cache_dir`, else the caller's (the run's output dir), else `$RTPURBO_CACHE/data`."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    if cache_dir:
        return Path(cache_dir).expanduser()
    return rtpurbo_cache_root() / "data"


def haystack_texts(cfg: DataConfig, sources: list[ResolvedSource]) -> list[str]:
    """Training-split texts of the user sources, for `synthetic.haystack: sources` (capped in size)."""
    texts, size = [], 0
    for src in sources:
        for index, text in iter_documents(src, SkipCounter()):
            if is_held_out(src.name, index, cfg.eval_fraction):
                continue
            texts.append(text)
            size += len(text)
            if size >= HAYSTACK_TEXT_LIMIT:
                return texts
    if not texts:
        raise UserError("data.synthetic.haystack is 'sources' but the data sources hold no usable training text")
    return texts


def _synthetic_documents(cfg: DataConfig, tokenizer, seq_len: int, texts) -> Callable[[SkipCounter], Iterator[tuple[int, str]]]:
    syn = cfg.synthetic

    def documents(skips: SkipCounter) -> Iterator[tuple[int, str]]:
        for i in range(syn.num_documents):
            try:
                yield i, mix_example(syn, i, tokenizer, seq_len=seq_len, texts=texts).text
            except ContextTooShort as err:
                raise UserError(f"{err}: raise the stage's seq_len, or set smaller data.synthetic.options / context_tokens") from err

    return documents


def _check_synthetic_lengths(cfg: DataConfig, seq_len: int) -> None:
    from ..synthetic import ANSWER_ROOM

    syn = cfg.synthetic
    if syn.context_tokens and max(syn.context_tokens) > seq_len - ANSWER_ROOM:
        raise UserError(
            f"data.synthetic.context_tokens {max(syn.context_tokens)} leaves no room for the answer in a "
            f"{seq_len}-token sequence (at most seq_len - {ANSWER_ROOM})"
        )


def build_stores(cfg: DataConfig, tokenizer, *, seq_len: int, cache_root: Path, show_progress: bool,
                 first: int = 0) -> list[tuple[str, float, TokenStore]]:
    """(name, weight, store) per mixture component, tokenising what is not cached yet, from the `first`-th
    component on (wrapping round): ranks that start at different components tokenise them in parallel
    (each store is still built once; a rank that reaches one being built waits for it)."""
    resolved = [resolve_source(s) for s in cfg.sources]
    jobs = []  # (name, weight, payload, documents)
    for src in resolved:
        payload = {"kind": src.kind, "source": src.fingerprint(), "field": src.config.text_field}
        jobs.append((src.name, src.config.weight, payload, lambda skips, src=src: iter_documents(src, skips)))
    if cfg.synthetic is not None:
        syn = cfg.synthetic
        _check_synthetic_lengths(cfg, seq_len)
        texts = haystack_texts(cfg, resolved) if syn.haystack == "sources" else None
        payload = {
            "kind": "synthetic",
            "config": syn.model_dump(mode="json", exclude={"weight"}),
            "seq_len": seq_len,
            "haystack": [s.fingerprint() for s in resolved] if texts is not None else None,
            "eval_fraction": cfg.eval_fraction if texts is not None else None,
        }
        jobs.append((SYNTHETIC_NAME, syn.weight, payload, _synthetic_documents(cfg, tokenizer, seq_len, texts)))
    order = [(first + i) % len(jobs) for i in range(len(jobs))]
    stores = {i: build_token_store(jobs[i][0], jobs[i][2], jobs[i][3], tokenizer, cache_root, show_progress) for i in order}
    return [(name, weight, stores[i]) for i, (name, weight, _, _) in enumerate(jobs)]


def prepare_source(cfg: DataConfig, name: str, weight: float, store: TokenStore, seq_len: int) -> PreparedSource:
    """Hold out eval documents, apply the length filters, and cut the rest into sequences."""
    lengths = store.lengths
    held = np.zeros(store.n_docs, dtype=bool)
    if name != SYNTHETIC_NAME:  # the synthetic mix has its own eval stream
        held = np.array([is_held_out(name, int(r), cfg.eval_fraction) for r in store.record_index], dtype=bool)
    too_short = lengths < cfg.min_tokens
    too_long = lengths > cfg.max_tokens if cfg.max_tokens is not None else np.zeros_like(too_short)
    skipped = SkipCounter(store.skipped)
    skipped["too_short"] += int(too_short.sum())
    skipped["too_long"] += int((too_long & ~too_short).sum())
    usable = ~too_short & ~too_long
    train = np.flatnonzero(usable & ~held)
    sequences, dropped = chunk_documents(train, lengths[train], seq_len, cfg.min_tokens)
    if len(sequences) == 0:
        raise UserError(f"data source {name} has no usable training documents (skipped: {skipped.as_dict() or 'none'}, held out for eval: {int((usable & held).sum())})")
    return PreparedSource(name, weight, store, train, int((usable & held).sum()), sequences, skipped.as_dict(), dropped)
