"""The synthetic training mix: example `i` of a `SyntheticConfig` stream."""
from __future__ import annotations

import random
from typing import Optional, Sequence

from .compose import ContextTooShort, SyntheticExample
from .config import SyntheticConfig
from .tasks import make_example

ANSWER_ROOM = 64  # tokens after an explicit `context_tokens` prompt that a sequence must still hold


def mix_example(
    cfg: SyntheticConfig, index: int, tokenizer, *, seq_len: int, texts: Optional[Sequence[str]] = None, stream: str = "train"
) -> SyntheticExample:
    """Example `index` of the stream; its task, length, depth and values come from (`cfg.seed`,
    `stream`, `index`) alone. `stream` separates training examples from held-out ones ("eval").

    Without `cfg.context_tokens` the document (prompt + answer, plus the eos the tokeniser cache
    appends) fills one training sequence of `seq_len` tokens. A task whose fixed text does not fit is
    replaced by the next task of a seeded order; `ContextTooShort` when none fits."""
    rng = random.Random(f"rtpurbo-mix:{cfg.seed}:{stream}:{index}")
    names, weights = zip(*cfg.tasks.items())
    first = rng.choices(names, weights=weights)[0]
    others = [t for t in names if t != first]
    rng.shuffle(others)
    if cfg.context_tokens:
        context, include_answer = rng.choice(cfg.context_tokens), False
    else:
        context, include_answer = seq_len - 1, True
    depth = rng.choice(cfg.depths) if cfg.depths else rng.random()
    seed = rng.getrandbits(31)
    for task in [first] + others:
        try:
            return make_example(task, tokenizer, context_tokens=context, depth=depth, seed=seed, texts=texts,
                                options=cfg.options, include_answer=include_answer)
        except ContextTooShort:
            continue
    raise ContextTooShort(f"synthetic data: a {context}-token document is too short for every task in {list(names)}")
