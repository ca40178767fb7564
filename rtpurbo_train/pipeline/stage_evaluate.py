"""Evaluate stage: dense vs sparse on the same prompts -> DIR/report.md, DIR/metrics.json, DIR/plots/.

Which text: the held-out documents of `data.sources` (the document-level hold-out of
`data.eval_fraction`, never trained on) for perplexity and, with `haystack: heldout` (or `auto` when the
recipe has sources), as the haystacks of the needle prompts. A recipe without sources measures
perplexity on held-out synthetic documents and hides needles in generated filler; the report says so.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional

from .. import distributed as dist
from ..errors import UserError
from ..evaluation import evaluate
from ..synthetic import ContextTooShort

MAX_EVAL_TEXTS = 200


@dataclass
class EvalTexts:
    """The texts one evaluation reads, and how the report names them."""

    perplexity: list[str]
    haystack: Optional[list[str]]  # None: the generated filler
    perplexity_label: str
    haystack_label: str


def heldout_documents(data, tokenizer, limit: int = MAX_EVAL_TEXTS) -> tuple[list[str], dict[str, int]]:
    """Up to `limit` held-out documents of `data.sources`, taken from the sources in turn (round robin, so
    every source is represented), and how many each source gave. Only the user sources: no synthetic text."""
    from ..data import iter_texts

    per_source = []
    for source in data.sources:
        alone = data.model_copy(update={"sources": [source], "synthetic": None})
        per_source.append((source.path, iter_texts(alone, split="eval", tokenizer=tokenizer)))
    texts, counts = [], {path: 0 for path, _ in per_source}
    active = list(per_source)
    while active and len(texts) < limit:
        for item in list(active):
            text = next(item[1], None)
            if text is None:
                active.remove(item)
                continue
            texts.append(text)
            counts[item[0]] += 1
            if len(texts) >= limit:
                break
    return texts, counts


def _describe(counts: dict[str, int], eval_fraction: float) -> str:
    names = ", ".join(f"{path}: {n}" for path, n in counts.items())
    return (f"held-out real documents of data.sources ({names}; whole documents held out by data.eval_fraction "
            f"{eval_fraction:g}, never trained on)")


def select_texts(data, stage, tokenizer) -> EvalTexts:
    """The perplexity texts and the needle haystack for `stage` (see the module docstring)."""
    from ..data import iter_texts

    mode = stage.haystack
    if mode == "auto":
        mode = "heldout" if data.sources else "generated"
    if not data.sources:
        if mode == "heldout":
            raise UserError("evaluate: haystack is 'heldout' but the recipe has no data.sources to hold documents "
                            "out of; add data.sources or set haystack: generated")
        # synthetic documents are generated to fit seq_len minus answer room: ask for longer ones so they
        # cover perplexity_len
        synthetic = list(itertools.islice(iter_texts(data, split="eval", tokenizer=tokenizer,
                                                     seq_len=2 * stage.perplexity_len), MAX_EVAL_TEXTS))
        return EvalTexts(synthetic, None, "held-out synthetic documents (generated filler with needle tasks; "
                         "not comparable to perplexity on real text)", "generated filler sentences")
    real, counts = heldout_documents(data, tokenizer)
    if not real:
        raise UserError(f"evaluate: data.sources give no held-out documents (data.eval_fraction "
                        f"{data.eval_fraction:g}, min_tokens {data.min_tokens}); raise data.eval_fraction")
    label = _describe(counts, data.eval_fraction)
    if mode == "generated":
        return EvalTexts(real, None, label, "generated filler sentences")
    return EvalTexts(real, real, label, label)


def run_evaluate(ctx, stage, name: str) -> None:
    texts = select_texts(ctx.recipe.data, stage, ctx.tokenizer)
    same = texts.haystack is not None and texts.haystack_label == texts.perplexity_label
    ctx.monitor.info(f"evaluation text: perplexity on {texts.perplexity_label}; needle haystack: "
                     f"{'the same documents' if same else texts.haystack_label}")
    ctx.model.eval()
    try:
        evaluate(ctx.model, ctx.tokenizer, ctx.runtime, ctx.plan, lengths=stage.lengths, depths=stage.depths,
                 samples_per_cell=stage.samples_per_cell, tasks=stage.tasks, perplexity_texts=texts.perplexity,
                 perplexity_len=stage.perplexity_len, perplexity_docs=stage.perplexity_docs,
                 timing_runs=stage.timing_runs, out_dir=ctx.out_dir, seed=ctx.recipe.seed, monitor=ctx.monitor,
                 haystack_texts=texts.haystack,
                 text_sources={"perplexity": texts.perplexity_label, "haystack": texts.haystack_label},
                 progress=dist.is_main())
    except ContextTooShort as err:
        raise UserError(f"evaluate: {err}; raise the stage's lengths or drop that task from its tasks") from None
    ctx.monitor.info(f"evaluation report: {ctx.out_dir / 'report.md'}")
