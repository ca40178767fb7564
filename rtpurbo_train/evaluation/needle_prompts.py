"""The needle prompts of the accuracy grid: synthetic tasks (rtpurbo_train.synthetic) at each
(context length, depth) cell, tokenised for one teacher-forced forward."""
from __future__ import annotations

from typing import Optional, Sequence

from ..synthetic import TASKS, make_example
from .needle_scoring import NeedlePrompt


def tokenize_example(tokenizer, prompt: str, answer: str, length: int, depth: float, task: str = "") -> NeedlePrompt:
    """Prompt ids as the model sees the prompt (`add_special_tokens=True`, as the generator measured
    it); answer ids as they follow the prompt in `prompt + answer` (what greedy decoding must emit),
    or the answer tokenised alone when joint tokenisation does not keep the prompt's ids as a prefix."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    joint = tokenizer(prompt + answer)["input_ids"]
    if joint[:len(prompt_ids)] == prompt_ids and len(joint) > len(prompt_ids):
        answer_ids = joint[len(prompt_ids):]
    else:
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return NeedlePrompt(tuple(prompt_ids), tuple(answer_ids), length, depth, task)


def build_needle_prompts(tokenizer, lengths: Sequence[int], depths: Sequence[float], samples_per_cell: int,
                         seed: int, tasks: Sequence[str] = ("passkey",),
                         haystack_texts: Optional[Sequence[str]] = None) -> list[NeedlePrompt]:
    """`samples_per_cell` prompts per (length, depth), ordered by length, depth, sample.

    The tasks rotate over the whole grid: prompt j (in that order) runs `tasks[j % len(tasks)]`, so a
    small grid still covers every task, and with `samples_per_cell` a multiple of `len(tasks)` every cell
    holds each task equally. Each prompt has its own seed (so its own values and haystack window), fixed
    by (`seed`, cell, k): the same call gives the same prompts. `haystack_texts`: the text the needles
    are hidden in (None: the generated filler sentences).
    """
    unknown = [t for t in tasks if t not in TASKS]
    if not tasks or unknown:
        raise ValueError(f"needle tasks must be a non-empty subset of {list(TASKS)}, got {list(tasks)}")
    prompts = []
    for li, length in enumerate(lengths):
        for di, depth in enumerate(depths):
            for k in range(samples_per_cell):
                prompt_seed = ((seed * len(lengths) + li) * len(depths) + di) * samples_per_cell + k
                task = tasks[len(prompts) % len(tasks)]
                example = make_example(task, tokenizer, context_tokens=length, depth=depth,
                                       seed=prompt_seed, texts=haystack_texts)
                prompts.append(tokenize_example(tokenizer, example.prompt, example.answer, length, depth, task))
    return prompts
