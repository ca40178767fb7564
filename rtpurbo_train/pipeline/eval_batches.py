"""Fixed held-out batches for the training stages' periodic evaluation (the data's `eval` split,
packed like training batches: one document per sequence, right-padded)."""
from __future__ import annotations

import itertools

import numpy as np

from ..data import collate, iter_texts
from ..errors import UserError


def build_eval_batches(cfg, tokenizer, *, seq_len: int, micro_batch_size: int, num_batches: int,
                       dp_rank: int = 0, dp_world: int = 1) -> list[dict]:
    """`num_batches` batches of this data-parallel rank's share of the eval split."""
    wanted = num_batches * micro_batch_size
    texts = iter_texts(cfg, split="eval", tokenizer=tokenizer, seq_len=seq_len)
    mine = itertools.islice(texts, dp_rank, None, dp_world)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    sequences = []
    for text in itertools.islice(mine, wanted):
        ids = tokenizer(text, verbose=False)["input_ids"] + eos
        sequences.append(np.asarray(ids[:seq_len], dtype=np.int64))
    if not sequences:
        raise UserError("the data has no held-out documents for evaluation: raise data.eval_fraction or add "
                        "data.synthetic")
    return [collate(sequences[i:i + micro_batch_size], seq_len, tokenizer.pad_token_id)
            for i in range(0, len(sequences), micro_batch_size)]
