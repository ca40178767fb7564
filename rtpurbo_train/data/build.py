"""Entry points: `build_train_loader` (training batches) and `iter_texts` (raw documents)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Literal, Optional

from ..errors import UserError
from ..synthetic import mix_example
from .config import DataConfig
from .corpus import build_stores, prepare_source, resolve_cache_root
from .loader import TrainLoader
from .records import SkipCounter
from .sources import iter_documents, resolve_source
from .split import is_held_out


def check_sources(cfg: DataConfig) -> None:
    """Every source's path resolves (files exist, one known format): a UserError naming the first that does
    not, before a run loads anything. Reads no records."""
    for source in cfg.sources:
        resolve_source(source)


def build_train_loader(
    cfg: DataConfig,
    tokenizer,
    *,
    seq_len: int,
    micro_batch_size: int,
    seed: int,
    dp_rank: int = 0,
    dp_world: int = 1,
    cache_dir: Optional[str | Path] = None,
    show_progress: bool = False,
) -> TrainLoader:
    """The training loader for `cfg` (see `loader.py` for sampling and sharding, `packing.py` for
    how documents become [B, T] batches).

    Tokenises each source once into the cache (`data.cache_dir`, else `cache_dir` — the run's output
    dir — else `$RTPURBO_CACHE/data`); concurrent ranks share one build, each starting at its own source.
    `show_progress`: a tqdm bar while tokenising (rank 0 only)."""
    if seq_len < 2:
        raise UserError(f"seq_len must be >= 2, got {seq_len}")
    if tokenizer.pad_token_id is None:
        raise UserError("the tokenizer has no pad token (load models with rtpurbo_train.models.load_model)")
    root = resolve_cache_root(cfg, cache_dir)
    stores = build_stores(cfg, tokenizer, seq_len=seq_len, cache_root=root, show_progress=show_progress, first=dp_rank)
    prepared = [prepare_source(cfg, name, weight, store, seq_len) for name, weight, store in stores]
    return TrainLoader(prepared, seq_len=seq_len, micro_batch_size=micro_batch_size, seed=seed, shuffle_seed=cfg.shuffle_seed,
                       dp_rank=dp_rank, dp_world=dp_world, pad_id=tokenizer.pad_token_id)


def iter_texts(
    cfg: DataConfig,
    split: Literal["train", "eval"] = "train",
    *,
    tokenizer=None,
    seq_len: Optional[int] = None,
) -> Iterator[str]:
    """The clean raw texts of `split`, source by source, in file order (lazily).

    User sources: records that pass the content checks and belong to `split` (the same hold-out
    as the training loader). With a `tokenizer`, the `min_tokens` / `max_tokens` filters apply too.
    Then, when `cfg.synthetic` is set and `tokenizer` and `seq_len` are given, the synthetic documents
    of that split's own stream (eval examples differ from training ones)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    eos_room = 1 if tokenizer is not None and tokenizer.eos_token_id is not None else 0
    for source in cfg.sources:
        src = resolve_source(source)
        for index, text in iter_documents(src, SkipCounter()):
            if is_held_out(src.name, index, cfg.eval_fraction) != (split == "eval"):
                continue
            if tokenizer is not None:
                # Same length as the training cache counts: special tokens plus the appended eos.
                n = len(tokenizer(text, verbose=False)["input_ids"]) + eos_room
                if n < cfg.min_tokens or (cfg.max_tokens is not None and n > cfg.max_tokens):
                    continue
            yield text
    if cfg.synthetic is not None and tokenizer is not None and seq_len is not None:
        texts = None
        if cfg.synthetic.haystack == "sources":
            from .corpus import haystack_texts

            texts = haystack_texts(cfg, [resolve_source(s) for s in cfg.sources])
        for i in range(cfg.synthetic.num_documents):
            yield mix_example(cfg.synthetic, i, tokenizer, seq_len=seq_len, texts=texts, stream=split).text
