"""Haystacks: long filler text in which needles are hidden.

A haystack is a stream of *units*, each a sentence with its own leading separator (`" Sentence."`,
or `"\\n\\nSentence."` at a paragraph start), so that units concatenate into text and a unit's
token count measured alone is (almost) its count in context: BPE tokenizers merge a leading space
into the next word, and a unit never ends in whitespace.

Two sources: `GeneratedHaystack` (English-like text made procedurally from the word lists in
`words.py`, seeded, endless) and `TextHaystack` (the user's texts split into sentences, cycled).
"""
from __future__ import annotations

import random
import re
from typing import Iterator, Optional, Sequence

from . import words as W

TOKENIZE_BATCH = 64  # units tokenized per call while filling a token budget


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


class GeneratedHaystack:
    """Endless, deterministic English-like filler (no digits, no `VALUE_WORDS`)."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def _sentence(self, rng: random.Random) -> str:
        c = rng.choice
        the = c(("the", "the", "the", "a", "one", "every", "that"))
        adj, adj2 = c(W.ADJECTIVES), c(W.ADJECTIVES)
        noun, noun2, noun3 = c(W.NOUNS), c(W.NOUNS), c(W.NOUNS)
        tv, iv, adv, prep, name = c(W.TRANSITIVE_VERBS), c(W.INTRANSITIVE_VERBS), c(W.ADVERBS), c(W.PREPOSITIONS), c(W.NAMES)
        templates = (
            f"The {adj} {noun} {tv} {the} {noun2} {prep} the {noun3}.",
            f"{name} {tv} {_article(adj)} {adj} {noun} {adv}.",
            f"{c(W.CONNECTORS)}, the {noun} {iv} {prep} the {adj} {noun2}.",
            f"The {noun} of the {noun2} {iv} {adv}.",
            f"{name} said that the {adj} {noun} {tv} the {noun2}.",
            f"There was {_article(adj)} {adj} {noun} {prep} the {noun2}, and nobody {tv} it.",
            f"The {noun} and the {noun2} {iv} together {prep} the {adj2} {noun3}.",
            f"Nobody knew why the {noun} {iv} so {adv}.",
            f"{name} and {c(W.NAMES)} {tv} the {adj} {noun} before the {noun2} {iv}.",
            f"It was {_article(adj)} {adj} {noun}, {adj2} and {c(W.ADJECTIVES)}, like every {noun2} {prep} the {noun3}.",
        )
        return c(templates)

    def units(self) -> Iterator[str]:
        rng = random.Random(f"rtpurbo-haystack:{self.seed}")
        first = True
        while True:
            for i in range(rng.randint(3, 7)):  # a paragraph
                sep = "" if first else ("\n\n" if i == 0 else " ")
                first = False
                yield sep + self._sentence(rng)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
MAX_UNIT_WORDS = 40  # long sentences are cut so a unit stays a fine-grained step of the length


class TextHaystack:
    """The user's texts, split into sentence units and cycled endlessly from a seeded start text.

    A text is split only when the stream reaches it, so a haystack over a large corpus (the training
    texts of `synthetic.haystack: sources`, tens of MB) costs nothing until it is read."""

    def __init__(self, texts: Sequence[str], seed: int = 0):
        self.texts = texts if isinstance(texts, (list, tuple)) else list(texts)
        if not any(isinstance(t, str) and t.strip() for t in self.texts):
            raise ValueError("haystack texts are empty: give at least one non-empty string")
        self.seed = seed

    @staticmethod
    def pieces(text: str) -> list[str]:
        """The sentence units of one text (sentences, long ones cut to MAX_UNIT_WORDS words)."""
        out = []
        for sentence in _SENTENCE_END.split(text.strip()):
            tokens = sentence.split()
            out += [" ".join(tokens[i : i + MAX_UNIT_WORDS]) for i in range(0, len(tokens), MAX_UNIT_WORDS)]
        return out

    def units(self) -> Iterator[str]:
        n = len(self.texts)
        k = random.Random(f"rtpurbo-text-haystack:{self.seed}").randrange(n)
        first = True
        while True:
            text = self.texts[k % n]
            for i, piece in enumerate(self.pieces(text) if isinstance(text, str) else []):
                sep = "" if first else ("\n\n" if i == 0 else " ")
                first = False
                yield sep + piece
            k += 1


def make_haystack(texts: Optional[Sequence[str]] = None, seed: int = 0):
    """`TextHaystack` over `texts` when given, else the built-in `GeneratedHaystack`."""
    return TextHaystack(texts, seed) if texts is not None else GeneratedHaystack(seed)


def count_tokens(tokenizer, texts: Sequence[str]) -> list[int]:
    """Token count of each text alone, without special tokens."""
    if not texts:
        return []
    return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]]


def take_units(units: Iterator[str], tokenizer, budget: int) -> list[tuple[str, int]]:
    """Units (with their token counts) from `units` whose counts sum to at least `budget` tokens."""
    taken: list[tuple[str, int]] = []
    total = 0
    while total < budget:
        batch = [next(units) for _ in range(TOKENIZE_BATCH)]
        for unit, n in zip(batch, count_tokens(tokenizer, batch)):
            taken.append((unit, n))
            total += n
            if total >= budget:
                break
    return taken


def haystack_text(
    n_chars: Optional[int] = None,
    n_tokens: Optional[int] = None,
    *,
    tokenizer=None,
    seed: int = 0,
    texts: Optional[Sequence[str]] = None,
) -> str:
    """Filler text of exactly `n_chars` characters, or of at most `n_tokens` tokens (and at least
    `n_tokens` minus one sentence) as measured by `tokenizer` without special tokens.

    Deterministic in (`seed`, `texts`); `texts` replaces the built-in generator by the user's text."""
    if (n_chars is None) == (n_tokens is None):
        raise ValueError("give exactly one of n_chars, n_tokens")
    units = make_haystack(texts, seed).units()
    if n_chars is not None:
        if n_chars < 0:
            raise ValueError(f"n_chars must be >= 0, got {n_chars}")
        parts, size = [], 0
        while size < n_chars:
            parts.append(next(units))
            size += len(parts[-1])
        return "".join(parts)[:n_chars]
    if tokenizer is None:
        raise ValueError("n_tokens needs a tokenizer")
    if n_tokens < 0:
        raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
    chosen = [u for u, _ in take_units(units, tokenizer, n_tokens)]
    text = "".join(chosen)
    # Unit counts are estimates of in-context counts; trim whole units until the real count fits.
    while chosen and len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]) > n_tokens:
        chosen.pop()
        text = "".join(chosen)
    return text
