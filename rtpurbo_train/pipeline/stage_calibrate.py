"""Calibrate stage: needle-echo retrieval scores -> plan.json, heatmap PNG, TensorBoard image."""
from __future__ import annotations

import itertools

from .. import distributed as dist
from ..calibration import calibrate, make_echo_documents, retrieval_heatmap_figure, save_heatmap
from ..synthetic import haystack_text

MAX_USER_TEXTS = 2000


def _haystack_ids(ctx, n_tokens: int) -> list[int]:
    """Token ids of haystack text: the user's training text when the recipe has sources, else the
    package's generator."""
    texts = None
    if ctx.recipe.data.sources:
        from ..data import iter_texts
        texts = list(itertools.islice(iter_texts(ctx.recipe.data, split="train"), MAX_USER_TEXTS))
    text = haystack_text(n_tokens=n_tokens, tokenizer=ctx.tokenizer, seed=ctx.recipe.seed, texts=texts or None)
    return ctx.tokenizer(text, add_special_tokens=False)["input_ids"]


def run_calibrate(ctx, stage, name: str) -> None:
    ctx.ensure_model()
    bos = [ctx.tokenizer.bos_token_id] if ctx.tokenizer.bos_token_id is not None else []
    haystack = _haystack_ids(ctx, 2 * max(stage.lengths))
    docs = make_echo_documents(haystack, lengths=stage.lengths, docs_per_length=stage.docs_per_length,
                               needle_len=stage.needle_tokens, seed=ctx.recipe.seed, prefix_ids=bos)
    plan, q_scores = calibrate(ctx.model, docs, fraction=ctx.recipe.sparsity.retrieval_fraction,
                               plan_settings=ctx.plan_settings(), progress=dist.is_main())
    if dist.is_main():
        save_heatmap(q_scores, ctx.out_dir / "calibration_heads.png", plan)
        ctx.monitor.add_figure("calibration/retrieval_scores", retrieval_heatmap_figure(q_scores, plan))
    ctx.use_plan(plan)
