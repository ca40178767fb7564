"""Evaluate stage: dense vs sparse on the same prompts -> DIR/report.md, DIR/metrics.json, DIR/plots/."""
from __future__ import annotations

import itertools

from .. import distributed as dist
from ..evaluation import evaluate

MAX_EVAL_TEXTS = 200


def run_evaluate(ctx, stage, name: str) -> None:
    from ..data import iter_texts

    # synthetic documents are generated to fit seq_len minus answer room: ask for longer ones so they
    # cover perplexity_len
    texts = list(itertools.islice(iter_texts(ctx.recipe.data, split="eval", tokenizer=ctx.tokenizer,
                                             seq_len=2 * stage.perplexity_len), MAX_EVAL_TEXTS))
    user_haystack = texts if ctx.recipe.data.sources else None
    ctx.model.eval()
    evaluate(ctx.model, ctx.tokenizer, ctx.runtime, ctx.plan, lengths=stage.lengths, depths=stage.depths,
             samples_per_cell=stage.samples_per_cell, perplexity_texts=texts, perplexity_len=stage.perplexity_len,
             perplexity_docs=stage.perplexity_docs, out_dir=ctx.out_dir, seed=ctx.recipe.seed, monitor=ctx.monitor,
             haystack_texts=user_haystack, progress=dist.is_main())
    ctx.monitor.info(f"evaluation report: {ctx.out_dir / 'report.md'}")
