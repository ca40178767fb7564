"""Compose a task prompt to a token length: prefix + haystack with needles at depths + question.

Length is measured with the tokenizer as the model sees the prompt (`add_special_tokens=True`):
the prompt has at most `context_tokens` tokens; whole filler sentences are added while they fit,
then the gap is closed with the first words of one more sentence, so it falls short by a few
tokens at most. Depth `d` puts a needle at the sentence boundary where `d` of the filler tokens lie
before it (0 = right after the instruction, 1 = right before the question).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

from .haystack import count_tokens, take_units

FILL_SLACK = 256  # extra haystack tokens drawn beyond the estimate, to top the prompt up from
MAX_REFINE = 64  # bound on the measure-and-adjust rounds (2-3 are typical)


@dataclass
class NeedleSpec:
    """A needle sentence and where it goes: `depth` in [0, 1] of the haystack."""

    text: str
    depth: float
    role: str = "target"  # "target" (the queried fact) or "distractor"


@dataclass
class TaskParts:
    """What a task builder returns: the fixed text of one example, before the haystack is added."""

    task: str
    prefix: str  # instruction, ends with "\n\n"
    needles: list[NeedleSpec]
    question: str  # starts with "\n\n", ends so that `answer` follows directly
    answer: str  # starts with a space: prompt + answer reads as one text
    unique: list[str]  # must occur exactly once in the prompt (the values)
    absent_from_haystack: list[str] = field(default_factory=list)  # e.g. keys: not in the filler
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class SyntheticExample:
    """One synthetic long-context example.

    `needles[i]` holds `text`, `role`, `depth` (requested), `char_offset` into `prompt`,
    `token_offset` (tokens of `prompt[:char_offset]`) and `depth_measured` (in haystack tokens)."""

    task: str
    prompt: str
    answer: str
    context_tokens: int  # measured length of `prompt`
    target_tokens: int  # requested length
    depth: float
    needles: list[dict[str, Any]]
    metadata: dict[str, Any]

    @property
    def text(self) -> str:
        """Prompt followed by the answer: a training document."""
        return self.prompt + self.answer


class ContextTooShort(ValueError):
    """The requested length cannot hold the task's text even without haystack."""


class HaystackCollision(Exception):
    """A value or key also occurs in the haystack text; the builder draws new values."""


def _n_tokens(tokenizer, text: str) -> int:
    # verbose=False: long prompts past the tokenizer's model_max_length are intended here.
    return len(tokenizer(text, verbose=False)["input_ids"])


def _place(units: list[tuple[str, int]], needles: list[NeedleSpec]) -> list[tuple[int, NeedleSpec]]:
    """(boundary index, needle) pairs: boundary j sits before unit j (j = len(units) is the end)."""
    cum = [0]
    for _, n in units:
        cum.append(cum[-1] + n)
    total = cum[-1]
    placed = []
    for needle in needles:
        goal = needle.depth * total
        j = min(range(len(cum)), key=lambda i: (abs(cum[i] - goal), i))
        placed.append((j, needle))
    return sorted(placed, key=lambda p: p[0])  # stable: needles at one boundary keep their order


def _assemble(parts: TaskParts, units: list[tuple[str, int]]) -> tuple[str, list[tuple[int, NeedleSpec]]]:
    """The prompt and the character offset of each needle."""
    placed = _place(units, parts.needles)
    pieces: list[str] = [parts.prefix]
    size = len(parts.prefix)
    offsets = []
    k = 0
    for j in range(len(units) + 1):
        while k < len(placed) and placed[k][0] == j:
            sep = "" if size == len(parts.prefix) else " "
            offsets.append((size + len(sep), placed[k][1]))
            pieces.append(sep + placed[k][1].text)
            size += len(pieces[-1])
            k += 1
        if j < len(units):
            unit = units[j][0]
            if size == len(parts.prefix):
                unit = unit.lstrip()
            elif unit[0] not in " \n":  # a needle before a separator-less first unit
                unit = " " + unit
            pieces.append(unit)
            size += len(unit)
    pieces.append(parts.question)
    return "".join(pieces), offsets


def compose(
    parts: TaskParts, tokenizer, context_tokens: int, units: Iterator[str], depth: float, include_answer: bool = False
) -> SyntheticExample:
    """Fill `parts` with haystack units to `context_tokens` tokens (see the module docstring).

    `include_answer`: the budget covers prompt + answer (a training document that must fit a
    sequence); `context_tokens` of the result is still the prompt's own length."""
    if include_answer:
        # Measure everything with the answer glued to the question, then cut it off at the end.
        # (The values occur in the answer too, so their exactly-once check runs on the cut prompt.)
        measured = replace(parts, question=parts.question + parts.answer, unique=[])
        example = compose(measured, tokenizer, context_tokens, units, depth)
        example.prompt = example.prompt[: len(example.prompt) - len(parts.answer)]
        example.answer = parts.answer
        example.context_tokens = _n_tokens(tokenizer, example.prompt)
        _check_unique(parts, example.prompt)
        return example
    fixed_text = parts.prefix + "".join(" " + n.text for n in parts.needles) + parts.question
    fixed = _n_tokens(tokenizer, fixed_text)
    budget = context_tokens - fixed
    if budget < 0:
        raise ContextTooShort(f"context_tokens={context_tokens} is too short for task {parts.task}: its text without haystack takes {fixed} tokens")
    pool = take_units(units, tokenizer, budget + FILL_SLACK)
    filler = "".join(u for u, _ in pool)
    for s in parts.unique + parts.absent_from_haystack:
        if s in filler:
            raise HaystackCollision(s)

    # Start from the estimate (unit counts alone), then measure and adjust by whole units.
    k, acc = 0, 0
    while k < len(pool) and acc + pool[k][1] <= budget:
        acc += pool[k][1]
        k += 1
    limit = len(pool) + 1  # the fewest units known to overflow; never grow back to it
    for _ in range(MAX_REFINE):
        prompt, offsets = _assemble(parts, pool[:k])
        n = _n_tokens(tokenizer, prompt)
        if n > context_tokens and k > 0:
            limit = min(limit, k)
            excess, drop = n - context_tokens, 0
            while k > 0 and drop < excess:
                k -= 1
                drop += pool[k][1]
            continue
        if k + 1 < limit and k < len(pool) and n + pool[k][1] <= context_tokens:
            k += 1
            continue
        break
    if n > context_tokens:
        raise ContextTooShort(f"context_tokens={context_tokens} is too short for task {parts.task}: the prompt takes {n} tokens without haystack")
    if k < len(pool):
        prompt, offsets, n = _top_up(parts, tokenizer, pool[:k], pool[k][0], context_tokens, (prompt, offsets, n))
    _check_unique(parts, prompt)
    return SyntheticExample(
        task=parts.task,
        prompt=prompt,
        answer=parts.answer,
        context_tokens=n,
        target_tokens=context_tokens,
        depth=depth,
        needles=_needle_records(tokenizer, parts, prompt, offsets, n),
        metadata=dict(parts.metadata),
    )


def _check_unique(parts: TaskParts, prompt: str) -> None:
    for s in parts.unique:
        if prompt.count(s) != 1:
            raise HaystackCollision(s)


def _top_up(parts: TaskParts, tokenizer, units, next_unit: str, context_tokens: int, best):
    """Close the last gap (less than one sentence) with the longest word prefix of the next unit that
    fits, ended by a full stop; binary search over the word count."""
    words = next_unit.split(" ")
    lo, hi = 1, len(words) - 1
    while lo <= hi:
        m = (lo + hi) // 2
        piece = " ".join(words[:m]).rstrip(".,") + "."
        if not piece.strip(" \n."):
            lo = m + 1
            continue
        prompt, offsets = _assemble(parts, units + [(piece, 0)])
        n = _n_tokens(tokenizer, prompt)
        if n <= context_tokens:
            best, lo = (prompt, offsets, n), m + 1
        else:
            hi = m - 1
    return best


def _needle_records(tokenizer, parts: TaskParts, prompt: str, offsets, n_prompt: int) -> list[dict[str, Any]]:
    """Where each needle landed (see `SyntheticExample`). `depth_measured` = filler tokens before the
    needle / all filler tokens (other needles excluded from both), the quantity `depth` asks for."""
    prefix_tokens = _n_tokens(tokenizer, parts.prefix)
    question_tokens = count_tokens(tokenizer, [parts.question])[0]
    needle_tokens = count_tokens(tokenizer, [" " + needle.text for _, needle in offsets])
    filler = max(1, n_prompt - prefix_tokens - question_tokens - sum(needle_tokens))
    starts = None
    if getattr(tokenizer, "is_fast", False):
        # One pass: a needle's token offset = tokens that start before its first character.
        spans = tokenizer(prompt, return_offsets_mapping=True, verbose=False)["offset_mapping"]
        starts = [a for a, b in spans]
    records = []
    needles_before = 0
    for (char_offset, needle), own in zip(offsets, needle_tokens):  # offsets are in prompt order
        if starts is not None:
            token_offset = bisect.bisect_left(starts, char_offset)
        else:
            token_offset = _n_tokens(tokenizer, prompt[:char_offset])
        before = token_offset - prefix_tokens - needles_before
        records.append(
            dict(
                text=needle.text,
                role=needle.role,
                depth=needle.depth,
                char_offset=char_offset,
                token_offset=token_offset,
                depth_measured=min(1.0, max(0.0, before / filler)),
            )
        )
        needles_before += own
    return records
