"""Greedy exact match of a needle answer from ONE forward pass (teacher forcing).

Claim: greedy decoding of `prompt` reproduces `answer = a_1..a_A` token for token iff, in one forward
over `prompt + answer`, the argmax of the logits at every answer position equals the next answer
token. Proof by induction on k: greedy emits a_1 iff argmax(logits after the prompt) = a_1. If greedy
has emitted a_1..a_k, its input is exactly `prompt + a_1..a_k`, the same prefix the teacher-forced
pass sees (the model is causal, so later tokens do not change those logits), so it emits a_{k+1} iff
the teacher-forced argmax at that position is a_{k+1}. Ties are broken identically (first index) in
both. The first mismatch makes greedy diverge, and the teacher-forced check fails at the same position.
So the two tests agree; the forward pass is one prefill instead of A decoding steps.

Caveat for the sparse mode: the indexer picks key blocks per 64-query block from the mass averaged
over that block's queries, so the few answer tokens that share a query block with the end of the
prompt take part in that vote (as they would in a prefill of prompt + answer). Everything else is
causal. `greedy_decode_match` decodes token by token instead (one full forward per answer token,
stopping at the first miss) for when that difference matters; it costs up to A forwards per prompt.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class NeedlePrompt:
    """One needle query, tokenised.

    prompt_ids: the context and question; answer_ids: the tokens greedy decoding must produce.
    length / depth: the grid cell it belongs to (requested context length in tokens, needle depth
    in [0, 1]); task: the synthetic task that made it (for per-task accuracy).
    """
    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]
    length: int
    depth: float
    task: str = ""

    def __post_init__(self):
        if not self.prompt_ids:
            raise ValueError("NeedlePrompt.prompt_ids is empty: greedy decoding needs at least one prompt token")
        if not self.answer_ids:
            raise ValueError("NeedlePrompt.answer_ids is empty: there is nothing to match")

    def input_ids(self) -> torch.Tensor:
        """LongTensor [1, P + A]: prompt followed by the answer (the teacher-forced input)."""
        return torch.tensor([list(self.prompt_ids) + list(self.answer_ids)], dtype=torch.long)


def answer_predictions(logits: torch.Tensor, answer_len: int) -> torch.Tensor:
    """Greedy predictions for the answer tokens from the logits of a teacher-forced forward.

    logits [1, T, V] or [T, V] for the input `prompt + answer` (T = P + A), or only its last K >= A + 1
    positions (`logits_to_keep`). The logits at position t predict token t + 1, so the answer is
    predicted by positions P - 1 .. P + A - 2: the last A + 1 positions minus the final one.
    Returns LongTensor [A].
    """
    if logits.dim() == 3:
        if logits.shape[0] != 1:
            raise ValueError(f"answer_predictions takes one sequence, got batch {logits.shape[0]}")
        logits = logits[0]
    if logits.dim() != 2 or logits.shape[0] < answer_len + 1:
        raise ValueError(f"logits of shape {tuple(logits.shape)} do not cover an answer of {answer_len} tokens "
                         "plus the last prompt position")
    return logits[-(answer_len + 1):-1].argmax(dim=-1)


def greedy_exact_match(logits: torch.Tensor, prompt: NeedlePrompt) -> bool:
    """True iff greedy decoding after `prompt.prompt_ids` would produce exactly `prompt.answer_ids`
    (see the module docstring). logits: [1, K, V] or [K, V], the last K >= A + 1 positions of the
    forward over `prompt.input_ids()`."""
    pred = answer_predictions(logits, len(prompt.answer_ids))
    return bool(torch.equal(pred.cpu(), torch.tensor(prompt.answer_ids, dtype=torch.long)))


def greedy_decode_match(logits_fn: Callable[[torch.Tensor], torch.Tensor], prompt: NeedlePrompt) -> bool:
    """True iff greedy decoding reproduces `prompt.answer_ids`, decoded one token at a time.

    logits_fn: LongTensor [1, T] -> logits [1, T, V] of a whole-sequence forward (no KV cache).
    Stops at the first wrong token, so a miss usually costs one forward.
    """
    ids = list(prompt.prompt_ids)
    for target in prompt.answer_ids:
        logits = logits_fn(torch.tensor([ids], dtype=torch.long))
        if int(logits[0, -1].argmax()) != target:
            return False
        ids.append(target)
    return True
