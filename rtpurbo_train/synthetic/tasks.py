"""The synthetic long-context tasks (RULER-style), each `(prompt, answer)` plus where the needles are.

| task | needles | question -> answer |
| --- | --- | --- |
| `passkey` | "The pass key is 68219." | "... The pass key is" -> " 68219" |
| `single_needle` | one fact "One of the special magic numbers for K is: V." (RULER's single NIAH) | -> " V" |
| `multikey` | `num_keys` facts "One of the special magic numbers for K is: V."; one queried | -> " V" |
| `multivalue` | `num_values` facts under the same key | -> " V1, V2, V3" (order of appearance) |
| `vartrack` | chains "VAR ABCDE = 12345.", "VAR FGHIJ = ABCDE.", ... (`num_chains`, `num_hops`) | -> " ABCDE FGHIJ ..." |

`depth` is the position of the queried needle; for multivalue / vartrack it is the first of the
facts, the rest spread evenly between it and the end. Distractors go to random depths.
Values never occur in the filler: a builder draws again if one does (user text can hold digits).
"""
from __future__ import annotations

import random
import string
from typing import Callable, Optional, Sequence

from .compose import HaystackCollision, NeedleSpec, SyntheticExample, TaskParts, compose
from .config import TaskOptions
from .haystack import make_haystack
from .words import VALUE_WORDS

MAX_DRAWS = 32  # value draws before giving up on a haystack that contains every candidate


def draw_value(rng: random.Random, kind: str, digits: int) -> str:
    """A random needle value: a `digits`-digit number, a word from VALUE_WORDS, or a UUID-like string."""
    if kind == "number":
        return str(rng.randint(10 ** (digits - 1), 10**digits - 1))
    if kind == "word":
        return rng.choice(VALUE_WORDS)
    if kind == "uuid":
        hexdigits = "0123456789abcdef"
        return "-".join("".join(rng.choice(hexdigits) for _ in range(n)) for n in (8, 4, 4, 4, 12))
    raise ValueError(f"unknown value kind {kind!r}")


def draw_distinct(rng: random.Random, kind: str, digits: int, count: int, taken: set) -> list[str]:
    """`count` values of `kind` that differ from each other and from `taken` (updated)."""
    out = []
    while len(out) < count:
        value = draw_value(rng, kind, digits)
        if value not in taken:
            taken.add(value)
            out.append(value)
    return out


def _spread(depth: float, count: int) -> list[float]:
    """`count` increasing depths from `depth` toward the end, evenly spaced."""
    return [depth + (1.0 - depth) * i / count for i in range(count)]


_KIND_NOUN = {"number": "numbers", "word": "words", "uuid": "uuids"}


def build_passkey(rng: random.Random, depth: float, opts: TaskOptions) -> TaskParts:
    key = draw_value(rng, "number", opts.digits)
    return TaskParts(
        task="passkey",
        prefix="There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the pass key.\n\n",
        needles=[NeedleSpec(f"The pass key is {key}. Remember it.", depth)],
        question="\n\nWhat is the pass key? The pass key is",
        answer=f" {key}",
        unique=[key],
        metadata={"values": [key]},
    )


def build_multikey(rng: random.Random, depth: float, opts: TaskOptions) -> TaskParts:
    key_kind, value_kind = rng.choice(opts.key_kinds), rng.choice(opts.value_kinds)
    taken: set = set()
    keys = draw_distinct(rng, key_kind, opts.digits, opts.num_keys, taken)
    values = draw_distinct(rng, value_kind, opts.digits, opts.num_keys, taken)
    noun = _KIND_NOUN[value_kind]
    needles = [NeedleSpec(f"One of the special magic {noun} for {keys[0]} is: {values[0]}.", depth)]
    needles += [NeedleSpec(f"One of the special magic {noun} for {k} is: {v}.", rng.random(), "distractor") for k, v in zip(keys[1:], values[1:])]
    return TaskParts(
        task="multikey",
        prefix=f"Some special magic {noun} are hidden within the following text. Make sure to memorize them. "
        f"I will quiz you about the {noun} afterwards.\n\n",
        needles=needles,
        question=f"\n\nWhat is the special magic {noun[:-1]} for {keys[0]} mentioned in the provided text? "
        f"The special magic {noun[:-1]} for {keys[0]} mentioned in the provided text is",
        answer=f" {values[0]}",
        unique=values,
        absent_from_haystack=keys,
        metadata={"key": keys[0], "values": [values[0]], "key_kind": key_kind, "value_kind": value_kind, "distractor_keys": keys[1:]},
    )


def build_single_needle(rng: random.Random, depth: float, opts: TaskOptions) -> TaskParts:
    """RULER's single needle-in-a-haystack: the multikey template with one key and no distractors."""
    parts = build_multikey(rng, depth, opts.model_copy(update={"num_keys": 1}))
    parts.task = "single_needle"
    parts.prefix = parts.prefix.replace("Make sure to memorize them.", "Make sure to memorize it.")
    return parts


def build_multivalue(rng: random.Random, depth: float, opts: TaskOptions) -> TaskParts:
    key_kind = rng.choice(opts.key_kinds)
    taken: set = set()
    key = draw_distinct(rng, key_kind, opts.digits, 1, taken)[0]
    values = draw_distinct(rng, "number", opts.digits, opts.num_values, taken)
    needles = [NeedleSpec(f"One of the special magic numbers for {key} is: {v}.", d) for v, d in zip(values, _spread(depth, len(values)))]
    return TaskParts(
        task="multivalue",
        prefix="Some special magic numbers are hidden within the following text. Make sure to memorize them. "
        "I will quiz you about the numbers afterwards.\n\n",
        needles=needles,
        question=f"\n\nWhat are all the special magic numbers for {key} mentioned in the provided text? "
        f"The special magic numbers for {key} mentioned in the provided text are",
        answer=" " + ", ".join(values),
        unique=values,
        absent_from_haystack=[key],
        metadata={"key": key, "values": values, "key_kind": key_kind},
    )


def _var_name(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_uppercase) for _ in range(5))


def build_vartrack(rng: random.Random, depth: float, opts: TaskOptions) -> TaskParts:
    taken: set = set()
    numbers = draw_distinct(rng, "number", opts.digits, opts.num_chains, taken)
    chains = []
    for _ in range(opts.num_chains):
        names = []
        while len(names) < opts.num_hops:
            name = _var_name(rng)
            if name not in taken:
                taken.add(name)
                names.append(name)
        chains.append(names)
    needles = []
    for c, (names, number) in enumerate(zip(chains, numbers)):
        sources = [number] + names[:-1]
        start = depth if c == 0 else rng.random()
        role = "target" if c == 0 else "distractor"
        needles += [NeedleSpec(f"VAR {n} = {s}.", d, role) for n, s, d in zip(names, sources, _spread(start, len(names)))]
    target = chains[0]
    return TaskParts(
        task="vartrack",
        prefix="Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n",
        needles=needles,
        question=f"\n\nQuestion: Find all variables that are assigned the value {numbers[0]} in the text above. "
        f"Answer: According to the chain(s) of variable assignment in the text above, {len(target)} variables "
        f"are assigned the value {numbers[0]}, they are:",
        answer=" " + " ".join(target),
        unique=[],  # the value is also in the question; names are referenced twice by design
        absent_from_haystack=numbers + [n for names in chains for n in names],
        metadata={"values": target, "value": numbers[0], "chains": chains},
    )


TASK_BUILDERS: dict[str, Callable[[random.Random, float, TaskOptions], TaskParts]] = {
    "passkey": build_passkey,
    "single_needle": build_single_needle,
    "multikey": build_multikey,
    "multivalue": build_multivalue,
    "vartrack": build_vartrack,
}


def make_example(
    task: str,
    tokenizer,
    *,
    context_tokens: int,
    depth: float = 0.5,
    seed: int = 0,
    texts: Optional[Sequence[str]] = None,
    options: Optional[TaskOptions] = None,
    include_answer: bool = False,
) -> SyntheticExample:
    """One example of `task` with a prompt of (just under) `context_tokens` tokens and the queried
    needle at `depth`. Deterministic in all arguments; `texts` = the user's haystack text (else the
    built-in generator). `include_answer`: the length covers prompt + answer (training documents)."""
    if task not in TASK_BUILDERS:
        raise ValueError(f"unknown synthetic task {task!r}; tasks: {', '.join(TASK_BUILDERS)}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    opts = options or TaskOptions()
    rng = random.Random(f"rtpurbo-task:{task}:{seed}")
    haystack = make_haystack(texts, seed)
    for _ in range(MAX_DRAWS):
        parts = TASK_BUILDERS[task](rng, depth, opts)
        try:
            example = compose(parts, tokenizer, context_tokens, haystack.units(), depth, include_answer)
        except HaystackCollision:
            continue
        example.metadata["seed"] = seed
        return example
    raise ValueError(f"could not draw {task} values absent from the haystack text in {MAX_DRAWS} tries")
