"""Calibrate stage: needle-echo retrieval scores -> plan.json, heatmap PNG, TensorBoard image."""
from __future__ import annotations

import itertools

from .. import distributed as dist
from ..calibration import calibrate, make_echo_documents, retrieval_heatmap_figure, save_heatmap
from ..synthetic import haystack_text

MAX_USER_TEXTS = 2000


def _user_texts(ctx) -> list[str] | None:
    """The user's training texts when the recipe has sources (calibration haystack), else None."""
    if not ctx.recipe.data.sources:
        return None
    from ..data import iter_texts
    return list(itertools.islice(iter_texts(ctx.recipe.data, split="train"), MAX_USER_TEXTS)) or None


def calibration_documents(tokenizer, stage, seed: int, texts=None) -> list:
    """The needle-echo documents of a calibrate `stage`: windows of haystack text (`texts`, else the
    package's generator) with a bos prefix when the tokenizer has one."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    text = haystack_text(n_tokens=2 * max(stage.lengths), tokenizer=tokenizer, seed=seed, texts=texts)
    haystack = tokenizer(text, add_special_tokens=False)["input_ids"]
    return make_echo_documents(haystack, lengths=stage.lengths, docs_per_length=stage.docs_per_length,
                               needle_len=stage.needle_tokens, seed=seed, prefix_ids=bos)


def run_calibrate(ctx, stage, name: str) -> None:
    ctx.ensure_model()
    docs = calibration_documents(ctx.tokenizer, stage, ctx.recipe.seed, _user_texts(ctx))
    plan, q_scores = calibrate(ctx.model, docs, fraction=ctx.recipe.sparsity.retrieval_fraction,
                               plan_settings=ctx.plan_settings(), progress=dist.is_main())
    if dist.is_main():
        save_heatmap(q_scores, ctx.out_dir / "calibration_heads.png", plan)
        ctx.monitor.add_figure("calibration/retrieval_scores", retrieval_heatmap_figure(q_scores, plan))
    ctx.use_plan(plan)
