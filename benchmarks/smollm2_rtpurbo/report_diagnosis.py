"""The "Diagnosis" section of the benchmark report, from DIR/diagnose_*.json (written by diagnose.py)."""
from __future__ import annotations

import json
from pathlib import Path

from report_format import pct, table

VARIANT_LABELS = {
    "retrieval_full": "head split only (retrieval heads see every block)",
    "oracle": "oracle top-p (true attention mass picks the blocks)",
    "indexer": "the trained indexer (what the sparse model runs)",
    "oracle_window": "oracle top-p + the sliding window on retrieval heads",
    "indexer_window": "the trained indexer + the sliding window on retrieval heads",
}


def _variant_rows(diag: dict) -> list[list[str]]:
    rows = []
    for name, row in diag["variants"].items():
        for n in row["sparse"]:
            m = row["metrics"].get(n, {})
            hits = row.get("needle_hits", {}).get(n)
            rows.append([VARIANT_LABELS.get(name, name), n, pct(row["dense"][n], 0), pct(row["sparse"][n], 0),
                         pct(m.get("sparsity/mean"), 0), pct(m.get("recall/retrieval/mean"), 0),
                         pct(sum(hits.values()) / len(hits), 0) if hits else "-"])
    return rows


def _worst_heads(diag: dict, top: int = 5) -> list[str]:
    row = diag["variants"].get("indexer") or diag["variants"].get("oracle") or {}
    out = []
    for n, hits in row.get("needle_hits", {}).items():
        worst = sorted(hits.items(), key=lambda kv: kv[1])[:top]
        out.append(f"- {n} tokens, lowest needle hit rates (layer.KV head): "
                   + ", ".join(f"{h} {pct(v, 0)}" for h, v in worst))
    return out


def needle_head_lines(diag: dict, top: int = 8) -> list[str]:
    """Share of the dense model's needle attention held by the plan's retrieval query heads, and the
    heads that read the needle most."""
    mass_by_length = diag.get("needle_heads")
    if not mass_by_length:
        return []
    retrieval = {int(layer): heads for layer, heads in diag["retrieval_heads"].items()}
    out = []
    for n, rows in mass_by_length.items():
        hq = len(rows[0])
        group = hq // diag["num_kv_heads"]
        cells = [(rows[l][h], l, h, (h // group) in retrieval.get(l, [])) for l in range(len(rows)) for h in range(hq)]
        total = sum(c[0] for c in cells) or 1.0
        share = sum(c[0] for c in cells if c[3]) / total
        best = sorted(cells, reverse=True)[:top]
        out.append(f"- {n} tokens: retrieval heads hold {pct(share, 0)} of the needle attention; top heads "
                   "(layer.query head, * = retrieval): "
                   + ", ".join(f"{l}.q{h}{'*' if r else ''} {m:.2f}" for m, l, h, r in best))
    return out


def _model_label(diag: dict) -> str:
    if "--run-dir" in diag.get("command", ""):
        return "the run's export (its trained backbone, plan and indexers)"
    return "the pretrained model, calibrated by diagnose.py (indexers untrained: no `indexer` row)"


def diagnosis_section(root: Path) -> list[str]:
    files = sorted(root.glob("diagnose_*.json"))
    if not files:
        return []
    lines = ["## Diagnosis: where the needle accuracy goes", "",
             "`benchmarks/smollm2_rtpurbo/diagnose.py` scores the same needle prompts with each source of error "
             "removed in turn (float32, teacher-forced like the evaluation). Needle hit rate: how often a retrieval "
             "head's selection for the answer-predicting query block contains a block of the needle, averaged over "
             "retrieval heads. Sparsity: all heads; recall: retrieval heads.", ""]
    for path in files:
        diag = json.loads(path.read_text())
        lines += [f"### {path.stem.removeprefix('diagnose_')}", "",
                  f"- model: {_model_label(diag)}; window {diag.get('window', '?')}, top-p {diag.get('top_p', '?')}, "
                  f"{sum(len(h) for h in diag['retrieval_heads'].values())} retrieval KV heads",
                  f"- command: `{diag.get('command', '?')}` (device: {diag.get('device', '?')})", ""]
        lines += table(["variant", "tokens", "dense", "sparse", "sparsity", "retrieval recall", "needle hit rate"],
                        _variant_rows(diag))
        extra = _worst_heads(diag) + needle_head_lines(diag)
        lines += extra + ([""] if extra else [])
    return lines
