"""Tokenised documents on disk, keyed by what produced them.

One folder per (source fingerprint, tokenizer fingerprint, tokenisation settings):
`tokens.bin` (int32, all documents back to back), `offsets.npy` (int64 [n_docs + 1]),
`record_index.npy` (int64 [n_docs], the source record of each document), `meta.json` (written last:
a folder without it is incomplete). Built in a temporary folder and renamed into place; an OS file
lock makes concurrent ranks build it once while the others wait.

A document's tokens are `tokenizer(text)` with the tokenizer's own special tokens (e.g. a bos),
followed by eos when the tokenizer has one. Length filters are applied when the store is used, so
changing them does not re-tokenise.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from ..cache import exclusive_lock
from .records import SkipCounter

CACHE_VERSION = 1
TOKENIZE_BATCH = 256


def tokenizer_fingerprint(tokenizer) -> str:
    """Changes when the vocabulary, the normalisation/merges, or the special tokens change."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([str(tokenizer.all_special_tokens), tokenizer.eos_token_id, tokenizer("a b")["input_ids"]]).encode())
    return h.hexdigest()[:32]


@dataclass
class TokenStore:
    """Tokenised documents of one source. `tokens` is memory-mapped."""

    name: str
    tokens: np.ndarray  # int32 [total_tokens]
    offsets: np.ndarray  # int64 [n_docs + 1]
    record_index: np.ndarray  # int64 [n_docs]
    skipped: dict[str, int]  # content-level skips while reading the source
    key: str

    @property
    def n_docs(self) -> int:
        return len(self.record_index)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def doc(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]


def _key(payload: dict) -> str:
    return hashlib.sha256(json.dumps({"version": CACHE_VERSION, **payload}, sort_keys=True).encode()).hexdigest()[:24]


def _open(folder: Path, name: str, key: str) -> Optional[TokenStore]:
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    total = meta["total_tokens"]
    tokens = np.memmap(folder / "tokens.bin", dtype=np.int32, mode="r", shape=(total,)) if total else np.zeros(0, np.int32)
    return TokenStore(name, tokens, np.load(folder / "offsets.npy"), np.load(folder / "record_index.npy"), meta["skipped"], key)


def _eos_suffix(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def _write(folder: Path, documents: Iterator[tuple[int, str]], skips: SkipCounter, tokenizer, progress) -> None:
    eos = _eos_suffix(tokenizer)
    offsets, records, total = [0], [], 0
    with open(folder / "tokens.bin", "wb") as out:
        batch: list[tuple[int, str]] = []

        def flush():
            nonlocal total
            ids = tokenizer([t for _, t in batch], verbose=False)["input_ids"]
            for (index, _), doc in zip(batch, ids):
                if eos and (not doc or doc[-1] != eos[0]):
                    doc = list(doc) + eos
                out.write(np.asarray(doc, dtype=np.int32).tobytes())
                total += len(doc)
                offsets.append(total)
                records.append(index)
            progress.update(len(batch))
            batch.clear()

        for item in documents:
            batch.append(item)
            if len(batch) >= TOKENIZE_BATCH:
                flush()
        if batch:
            flush()
    np.save(folder / "offsets.npy", np.asarray(offsets, dtype=np.int64))
    np.save(folder / "record_index.npy", np.asarray(records, dtype=np.int64))
    (folder / "meta.json").write_text(json.dumps({"total_tokens": total, "n_docs": len(records), "skipped": skips.as_dict()}))


class _NoProgress:
    def update(self, n):
        pass

    def close(self):
        pass


def build_token_store(
    name: str,
    payload: dict,
    documents: Callable[[SkipCounter], Iterator[tuple[int, str]]],
    tokenizer,
    cache_root: Path,
    show_progress: bool = False,
) -> TokenStore:
    """The cached store for `payload` (which must identify the source and settings), building it from
    `documents(skips)` (yielding (record index, text)) when absent."""
    key = _key({**payload, "tokenizer": tokenizer_fingerprint(tokenizer)})
    cache_root.mkdir(parents=True, exist_ok=True)
    folder = cache_root / key
    store = _open(folder, name, key)
    if store is not None:
        return store
    with exclusive_lock(cache_root / f".{key}.lock"):
        store = _open(folder, name, key)  # another rank built it while this one waited
        if store is not None:
            return store
        tmp = cache_root / f".{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        if show_progress:
            from tqdm.auto import tqdm

            progress = tqdm(desc=f"tokenising {name}", unit=" docs", delay=2.0)
        else:
            progress = _NoProgress()
        try:
            skips = SkipCounter()
            _write(tmp, documents(skips), skips, tokenizer, progress)
            (tmp / "source.json").write_text(json.dumps({"name": name, **payload}, default=str))
            if folder.exists():
                shutil.rmtree(folder)
            os.rename(tmp, folder)
        finally:
            progress.close()
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return _open(folder, name, key)
