"""`report.md`: the evaluation results as Markdown tables (from the results dict of `harness.evaluate`)."""
from __future__ import annotations

import math

from .kv_cache import human_bytes


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|",
            *("| " + " | ".join(row) + " |" for row in rows), ""]


def _pct(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100.0 * x:.1f}%"


def _num(x: float, fmt: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _needle_section(needle: dict, lengths: list[int], depths: list[float], haystack: str) -> list[str]:
    lines = ["## Needle accuracy (greedy exact match)", "", f"Haystack: {haystack}.", "",
             f"Overall: dense {_pct(needle['dense'])}, sparse {_pct(needle['sparse'])} "
             f"(sparse / dense = {_interval(needle['sparse_over_dense'], needle.get('ratio_ci'), lambda x: _num(x, '.2f'))}, "
             f"95% CI); {needle['prompts_scored']} prompts, "
             f"scored by {needle['scoring'].replace('_', ' ')}.", ""]
    for mode in ("dense", "sparse"):
        grid = needle["grid"][mode]
        lines += [f"**{mode}** (rows: needle depth, columns: context length in tokens)", ""]
        lines += _table(["depth"] + [str(n) for n in lengths],
                        [[f"{d:g}"] + [_pct(v) for v in grid[r]] for r, d in enumerate(depths)])
    header = ["dense (95% CI)", "sparse (95% CI)", "sparse / dense (95% CI)", "prompts"]
    lines += ["Per length, per depth and per task, with 95% confidence intervals (Wilson for an accuracy, a "
              "paired bootstrap over prompts for the ratio):", ""]
    for title, rows in (("length", needle["by_length"]), ("depth", needle.get("by_depth", {})),
                        ("task", needle["by_task"])):
        if rows and (title != "task" or len(rows) > 1):
            lines += _table([title] + header, [[key] + _accuracy_cells(v) for key, v in rows.items()])
    return lines


def _interval(value: float, ci, fmt) -> str:
    if ci is None or any(isinstance(x, float) and math.isnan(x) for x in ci):
        return fmt(value)
    return f"{fmt(value)} ({fmt(ci[0])}-{fmt(ci[1])})"


def _accuracy_cells(v: dict) -> list[str]:
    ratio = lambda x: _num(x, ".2f")  # noqa: E731
    return [_interval(v["dense"], v.get("dense_ci"), _pct), _interval(v["sparse"], v.get("sparse_ci"), _pct),
            _interval(v.get("sparse_over_dense", float("nan")), v.get("ratio_ci"), ratio), str(v["prompts"])]


def _perplexity_section(ppl: dict, text: str) -> list[str]:
    lines = ["## Perplexity by position (held-out text)", "", f"Text: {text}.", ""]
    if "skipped" in ppl:
        return lines + [f"Not measured: {ppl['skipped']}", ""]
    lines += [f"{ppl['docs']} documents of {ppl['seq_len']} tokens. Overall: dense {_num(ppl['dense'])}, "
              f"sparse {_num(ppl['sparse'])}, increase {_pct(ppl['rel_increase'])}.", ""]
    rows = [[f"{b['start']}-{b['end'] - 1}", str(b["tokens"]), _num(b["dense_ppl"]), _num(b["sparse_ppl"]),
             _pct(b["rel_increase"])] for b in ppl["buckets"]]
    return lines + _table(["positions", "tokens", "dense ppl", "sparse ppl", "increase"], rows)


def _attention_section(attention: dict, num_layers: int) -> list[str]:
    by_length = attention["by_length"]
    lines = ["## Sparsity and attention recall", "",
             "Sparsity: fraction of causal 64-token key blocks skipped. Recall: full-attention mass that falls on "
             "the keys the sparse pattern keeps (sampled queries in the second half). Averaged over the needle "
             "prompts of each length, measured in the sparse forward.", ""]
    if not by_length:
        return lines + ["Not measured (the runtime recorded no metrics).", ""]
    lengths = list(by_length)
    summary_keys = [("sparsity/mean", "sparsity (all)"), ("sparsity/streaming/mean", "sparsity (streaming)"),
                    ("sparsity/retrieval/mean", "sparsity (retrieval)"), ("recall/mean", "recall (all)"),
                    ("recall/retrieval/mean", "recall (retrieval)")]
    rows = [[label] + [_pct(by_length[n].get(key)) for n in lengths] for key, label in summary_keys]
    lines += _table(["metric"] + [f"{n} tokens" for n in lengths], rows)
    rows = []
    for i in range(num_layers):
        cells = [(by_length[n].get(f"sparsity/layer{i}"), by_length[n].get(f"recall/layer{i}")) for n in lengths]
        rows.append([str(i)] + [f"{_pct(s)} / {_pct(r)}" for s, r in cells])
    lines += ["Per layer (sparsity / recall):", ""] + _table(["layer"] + [f"{n} tokens" for n in lengths], rows)
    return lines


def _kv_section(kv: dict) -> list[str]:
    rows = [[n, human_bytes(v["dense_bytes"]), human_bytes(v["sparse_bytes"]), _pct(v["fraction"])]
            for n, v in kv["by_length"].items()]
    return (["## KV-cache size", "", f"Per sequence, {kv['dtype']} cache; retrieval KV heads keep every token, "
             "streaming KV heads keep sink + window tokens.", ""]
            + _table(["tokens", "dense", "sparse", "sparse / dense"], rows))


def _prefill_section(prefill: dict) -> list[str]:
    rows = [[n, str(v["tokens"]), _num(1000.0 * v["dense_s"], ".1f"), _num(1000.0 * v["sparse_s"], ".1f"),
             _num(v["speedup"], ".2f") + "x"] for n, v in prefill["by_length"].items()]
    warmup = f"after {prefill['warmup']} warm-up run(s)" if prefill["warmup"] else "without a warm-up run"
    return (["## Prefill time", "", f"Device: {prefill['device']}; kernel backend: {prefill['backend']}; "
             f"median of {prefill['runs']} runs {warmup}; one forward without KV cache.", ""]
            + _table(["length", "tokens", "dense ms", "sparse ms", "speedup"], rows))


def _summary_section(results: dict) -> list[str]:
    """Headline numbers: overall needle accuracy, perplexity increase, and at the longest length
    sparsity, recall, KV-cache fraction and prefill speedup."""
    needle, ppl = results["needle"], results["perplexity"]
    longest = str(max(results["config"]["lengths"]))
    attention = results["attention"]["by_length"].get(longest, {})
    prefill = results["prefill"]["by_length"].get(longest, {})
    rows = [["needle accuracy", _pct(needle["dense"]), _pct(needle["sparse"]),
             f"sparse / dense {_num(needle['sparse_over_dense'])}"],
            ["perplexity", _num(ppl.get("dense")), _num(ppl.get("sparse")),
             "not measured" if "skipped" in ppl else f"increase {_pct(ppl['rel_increase'])}"],
            [f"sparsity at {longest} tokens", "0.0%", _pct(attention.get("sparsity/mean")),
             f"recall {_pct(attention.get('recall/mean'))}"],
            [f"KV cache at {longest} tokens", "100.0%", _pct(results["kv_cache"]["by_length"][longest]["fraction"]), ""],
            [f"prefill at {longest} tokens (ms)", _num(1000.0 * prefill.get("dense_s", float("nan")), ".1f"),
             _num(1000.0 * prefill.get("sparse_s", float("nan")), ".1f"), f"speedup {_num(prefill.get('speedup'), '.2f')}x"]]
    return ["## Summary", ""] + _table(["metric", "dense", "sparse", "note"], rows)


def render_report(results: dict) -> str:
    cfg = results["config"]
    lines = ["# RTPurbo evaluation: dense vs sparse", "",
             f"Model dtype {results['dtype']}, device {results['device']}, seed {cfg['seed']}. "
             f"Context lengths {cfg['lengths']}, depths {cfg['depths']}, {cfg['samples_per_cell']} prompt(s) per cell, "
             f"tasks {cfg['tasks']}.", ""]
    text = {"perplexity": "not recorded", "haystack": "not recorded", **cfg.get("text", {})}
    lines += [f"Text: perplexity on {text['perplexity']}; needle haystack: {text['haystack']}.", ""]
    lines += _summary_section(results)
    lines += _needle_section(results["needle"], cfg["lengths"], cfg["depths"], text["haystack"])
    lines += _perplexity_section(results["perplexity"], text["perplexity"])
    lines += _attention_section(results["attention"], results["plan"]["num_layers"])
    lines += _kv_section(results["kv_cache"])
    lines += _prefill_section(results["prefill"])
    lines += ["## Sparsity plan", "", "```", results["plan"]["summary"], "```", ""]
    if results.get("plots"):
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in results["plots"]] + [""]
    return "\n".join(lines)
