"""Packing: ONE DOCUMENT PER SEQUENCE.

A document longer than `seq_len` is cut into `seq_len`-token chunks, each its own training sequence
(a last chunk shorter than `min_tokens` is dropped and its tokens counted); a shorter document, or
the last chunk, is right-padded to `seq_len`. No sequence ever holds tokens of two documents, so no
token attends across a document boundary.

Padding is exact without an attention mask: training attention is causal and ignores masks, and
with *right* padding no real token has a pad token before it, so real tokens see exactly their own
document; pad positions compute garbage that no loss reads (labels are -100 there). `labels` follow
the Hugging Face convention: equal to `input_ids` (the model shifts them), -100 on padding.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = -100


@dataclass
class SequenceIndex:
    """Training sequences of one source: sequence i = tokens [start[i], start[i] + length[i]) of doc[i]."""

    doc: np.ndarray  # int64 [n_seq], document index in its token store
    start: np.ndarray  # int64 [n_seq]
    length: np.ndarray  # int64 [n_seq], in [min_tokens, seq_len] (or the whole short document)

    def __len__(self) -> int:
        return len(self.doc)


def chunk_documents(doc_ids: np.ndarray, lengths: np.ndarray, seq_len: int, min_tokens: int) -> tuple[SequenceIndex, int]:
    """Cut documents (`lengths[i]` tokens, already length-filtered) into sequences.

    Returns the index and the number of tokens in dropped short tail chunks."""
    doc_ids = np.asarray(doc_ids, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    n_chunks = -(-lengths // seq_len)
    doc = np.repeat(doc_ids, n_chunks)
    first = np.repeat(np.cumsum(n_chunks) - n_chunks, n_chunks)
    chunk = np.arange(len(doc), dtype=np.int64) - first  # chunk number within its document
    start = chunk * seq_len
    length = np.minimum(seq_len, np.repeat(lengths, n_chunks) - start)
    keep = (length >= min_tokens) | (chunk == 0)
    dropped = int(length[~keep].sum())
    return SequenceIndex(doc[keep], start[keep], length[keep]), dropped


def collate(sequences: list[np.ndarray], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token arrays to `seq_len`.

    Returns `input_ids` int64 [B, T] (pad_id on padding), `labels` int64 [B, T] (= input_ids, -100 on
    padding), `attention_mask` int64 [B, T] (1 real, 0 pad)."""
    batch = len(sequences)
    input_ids = torch.full((batch, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((batch, seq_len), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((batch, seq_len), dtype=torch.long)
    for row, seq in enumerate(sequences):
        n = len(seq)
        ids = torch.from_numpy(np.asarray(seq, dtype=np.int64))
        input_ids[row, :n] = ids
        labels[row, :n] = ids
        mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}
