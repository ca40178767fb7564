"""Dense vs sparse evaluation: needle accuracy grid, perplexity by position, sparsity/recall per layer,
KV-cache bytes, prefill time -> report.md, metrics.json, plots.

    runtime = attach_sparsity(model, plan)
    results = evaluate(model, tokenizer, runtime, plan, lengths=[1024, 2048], depths=[0.1, 0.5, 0.9],
                       samples_per_cell=2, perplexity_texts=iter_texts(cfg, split="eval"),
                       perplexity_len=1024, out_dir=run_dir / "eval", seed=0, monitor=monitor)
"""
from .harness import evaluate, needle_summary, scalar_metrics
from .needle_scoring import NeedlePrompt, answer_predictions, greedy_decode_match, greedy_exact_match
from .perplexity import BucketedPerplexity, position_buckets, token_nll

__all__ = ["BucketedPerplexity", "NeedlePrompt", "answer_predictions", "evaluate", "greedy_decode_match",
           "greedy_exact_match", "needle_summary", "position_buckets", "scalar_metrics", "token_nll"]
