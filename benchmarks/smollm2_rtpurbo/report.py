#!/usr/bin/env python
"""Build the result file of the SmolLM2-135M RTPurbo benchmark from whatever runs of run.py finished.

    python benchmarks/smollm2_rtpurbo/report.py --out-root DIR \
        --md benchmarks/results/smollm2_rtpurbo.md --png-dir benchmarks/results/smollm2_rtpurbo/

Reads, per run: DIR/<name>/{metrics.json, metrics.jsonl, recipe.yaml, plan.json, state.json, DONE},
DIR/<name>.time.json and DIR/<name>.log (per-stage times), plus DIR/status.json, DIR/environment.json and
DIR/diagnose_*.json (diagnose.py).
Numbers come only from those files; a missing or unfinished run is listed as such.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report_diagnosis import diagnosis_section  # noqa: E402
from report_format import human_bytes, missing, num, pct, seconds, signed_pct, table  # noqa: E402
from run import SHORT_NOTE, define_runs  # noqa: E402  (the run names and notes, in order)

TARGET_LENGTH = 8192
NEEDLE_RATIO, PPL_INCREASE, SPARSITY = 0.98, 0.01, 0.75  # issue 16: needle >= 0.98 of dense, perplexity <= +1%, 75% at 8K
STAGE_TYPES = ("calibrate", "indexer_warmup", "sparse_train", "export", "evaluate")
CURVES = [  # (file stem, title, [metric keys]) from metrics.jsonl, x = global step
    ("loss", "train/loss (warm-up: indexer KL; sparse stage: weighted sum)", ["train/loss"]),
    ("distill", "top-k self-distillation loss", ["train/loss_distill"]),
    ("indexer_kl", "indexer KL (nats per token)", ["train/loss_indexer_kl"]),
    ("sparsity_recall", "block sparsity and attention recall (training batches)", ["sparsity/mean", "recall/mean"]),
    ("ssa_align", "SSA alignment loss", ["train/loss_ssa_align"]),
]


# ---------------------------------------------------------------- reading a run

def read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def read_metrics_rows(path: Path) -> list[dict]:
    """metrics.jsonl merged per (stage, step): a stage's last step has a training and an eval/ record, and a
    resumed stage logs some steps twice (the later values win)."""
    if not path.is_file():
        return []
    rows = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            rows.setdefault((r["stage"], r["step"]), {}).update(r)
    return sorted(rows.values(), key=lambda r: (r["global_step"], r["time"]))


def stage_times(log: Path) -> dict[str, float]:
    """'[rtpurbo] 2-sparse_train: done in 63.0s' lines of the run's log -> {stage type: seconds}, plus
    'pipeline' from 'recipe ... finished in'. A stage resumed by a later launch counts that launch only."""
    if not log.is_file():
        return {}
    text = log.read_text(errors="replace")
    times = {m[1]: float(m[2]) for m in re.finditer(r"\[rtpurbo\] \d+-(\w+): done in ([\d.]+)s", text)}
    total = re.findall(r"\[rtpurbo\] recipe \S+ finished in ([\d.]+)s", text)
    if total:
        times["pipeline"] = float(total[-1])
    return times


def load_run(root: Path, name: str, note: str) -> dict:
    d = root / name
    run = {"name": name, "note": note, "dir": d, "timing": read_json(root / f"{name}.time.json"),
           "eval": read_json(d / "metrics.json"), "plan": read_json(d / "plan.json"),
           "state": read_json(d / "state.json") or {"completed": []},
           "recipe": yaml.safe_load((d / "recipe.yaml").read_text()) if (d / "recipe.yaml").is_file() else None,
           "rows": read_metrics_rows(d / "metrics.jsonl"), "times": stage_times(root / f"{name}.log")}
    run["status"] = "done" if (d / "DONE").is_file() else ("unfinished" if d.is_dir() else "not run")
    return run


# ---------------------------------------------------------------- formatting

def length_label(n) -> str:
    n = int(n)
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


# ---------------------------------------------------------------- derived numbers

def stage_of(recipe: dict, kind: str):
    return next((s for s in (recipe or {}).get("stages", []) if s.get("type") == kind), None)


def steps_label(recipe: dict) -> str:
    parts = []
    for kind, label in (("indexer_warmup", "warm-up"), ("sparse_train", "sparse")):
        s = stage_of(recipe, kind)
        parts.append(f"{label} {s['steps']} x {s['grad_accum']}" if s else f"no {label}")
    return ", ".join(parts)


def selection_label(recipe: dict) -> str:
    sp, st = recipe["sparsity"], stage_of(recipe, "sparse_train") or {}
    sel = f"top-k {sp['top_k']}" if sp.get("top_k") else f"top-p {sp['top_p']}"
    ssa = (st.get("losses") or {}).get("ssa_align")
    return (sel + (f", mode {st['mode']}" if st.get("mode", "sparse") != "sparse" else "")
            + (f", ssa_align {ssa:g}" if ssa else ""))


def target_length(ev: dict) -> str | None:
    """TARGET_LENGTH when evaluated, else None (the sparsity target is stated at 8K)."""
    return str(TARGET_LENGTH) if str(TARGET_LENGTH) in ev["attention"]["by_length"] else None


def longest(ev: dict) -> str:
    return str(max(ev["config"]["lengths"]))


def targets(ev: dict) -> dict[str, tuple[str, str]]:
    """{target: (PASS | MISSED | not measured, detail)} for one run's evaluation."""
    out = {}
    rows = ev["needle"]["by_length"]
    if any(missing(v["dense"]) or missing(v["sparse"]) for v in rows.values()) or not rows:
        out["needle"] = ("not measured", "a length has no scored prompts")
    else:
        bad = [n for n, v in rows.items() if v["sparse"] < NEEDLE_RATIO * v["dense"]]
        no_reference = [n for n, v in rows.items() if v["dense"] == 0]  # dense 0%: the ratio says nothing
        detail = ", ".join(f"{length_label(n)}: sparse {pct(v['sparse'], 0)} vs dense {pct(v['dense'], 0)}"
                           for n, v in rows.items())
        verdict = "MISSED" if bad else ("not measured" if no_reference else "PASS")
        out["needle"] = (verdict, detail + (" (dense 0% at " + ", ".join(map(length_label, no_reference)) + ")"
                                            if no_reference and not bad else ""))
    ppl = ev["perplexity"]
    if "skipped" in ppl or missing(ppl.get("rel_increase")):
        out["ppl"] = ("not measured", ppl.get("skipped", ""))
    else:
        out["ppl"] = ("PASS" if ppl["rel_increase"] <= PPL_INCREASE else "MISSED", signed_pct(ppl['rel_increase']))
    n = target_length(ev)
    s = ev["attention"]["by_length"].get(n, {}).get("sparsity/mean") if n else None
    if missing(s):
        out["sparsity"] = ("not measured", f"no sparsity at {TARGET_LENGTH} tokens (lengths evaluated: "
                                           f"{ev['config']['lengths']})")
    else:
        out["sparsity"] = ("PASS" if s >= SPARSITY else "MISSED", pct(s))
    return out


# ---------------------------------------------------------------- sections

def header_section(runs: list[dict], root: Path) -> list[str]:
    env = read_json(root / "environment.json") or {}
    devices = sorted({r["eval"]["device"] for r in runs if r["eval"]})
    starts = [a["start"] for r in runs if r["timing"] for a in r["timing"]["attempts"]]
    pk = env.get("packages", {})
    recipe = next((r["recipe"] for r in runs if r["recipe"]), None)
    what = f"{recipe['model']['name_or_path']}, {recipe['name']}" if recipe else "no run found"
    lines = [f"# RTPurbo conversion benchmark ({what}): full recipe and short ablations", "",
             f"- report written: {time.strftime('%Y-%m-%d %H:%M %Z')} from `{root}` "
             f"(benchmarks/smollm2_rtpurbo/report.py)",
             f"- runs started: {min(starts) if starts else '-'} to {max(starts) if starts else '-'}",
             f"- device (evaluation json): {', '.join(devices) or 'no finished evaluation'}"]
    if env:
        lines.append(f"- GPUs (nvidia-smi): {env.get('gpus') or '-'}; "
                     + ", ".join(f"{k} {v}" for k, v in pk.items() if v)
                     + f"; python {env.get('python')}; commit {env.get('git_commit') or '-'}"
                     + (" (with uncommitted changes)" if env.get("git_dirty") else ""))
    return lines + [""]


def runs_section(runs: list[dict]) -> list[str]:
    lines = ["## Runs", ""]
    rows = []
    for r in runs:
        t, timing = r["times"], r["timing"] or {}
        attempts = len(timing.get("attempts", []))
        rows.append([r["name"], r["status"] + ("" if r["status"] != "unfinished" else
                                              f" (completed: {', '.join(r['state']['completed']) or 'none'})"),
                     seconds(timing.get("wall_s_total")) + (f" ({attempts} launches)" if attempts > 1 else ""),
                     *(seconds(t.get(k)) for k in STAGE_TYPES), seconds(t.get("pipeline"))])
    lines += table(["run", "status", "wall (launcher)", *STAGE_TYPES, "pipeline"], rows)
    lines += ["Wall: the deepspeed command as the driver timed it (launcher, imports, model load included), "
              "summed over launches. Stage times: the pipeline's log; a stage resumed by a later launch counts "
              "only that launch.", "", "What each run is:", ""]
    lines += [f"- `{r['name']}`: {r['note']}" for r in runs] + ["", "Commands (run from the repository root):", ""]
    for r in runs:
        if r["timing"]:
            lines += [f"`{r['name']}`:", "```", r["timing"]["command"], "```"]
    return lines + [""]


def full_section(run: dict) -> list[str]:
    ev = run["eval"]
    lines = [f"## Full run ({run['recipe']['name'] if run['recipe'] else 'base recipe'}): dense vs sparse", ""]
    if not ev:
        return lines + [f"No evaluation: the full run is {run['status']}.", ""]
    cfg, needle, ppl = ev["config"], ev["needle"], ev["perplexity"]
    att, kv, pre = ev["attention"]["by_length"], ev["kv_cache"]["by_length"], ev["prefill"]["by_length"]
    lines += [f"{steps_label(run['recipe'])}; {selection_label(run['recipe'])}, retrieval fraction "
              f"{run['recipe']['sparsity']['retrieval_fraction']}, window {run['recipe']['sparsity']['window']}. "
              f"Evaluation: {needle['prompts_scored']} needle prompts ({cfg['samples_per_cell']} per length x depth, "
              f"depths {cfg['depths']}, {needle['scoring'].replace('_', ' ')}), dtype {ev['dtype']}.", ""]
    rows = [[f"needle accuracy {length_label(n)}", pct(v["dense"]), pct(v["sparse"]),
             f"sparse / dense {num(v['sparse'] / v['dense'] if v['dense'] else None, '.3f')}"]
            for n, v in needle["by_length"].items()]
    rows.append(["needle accuracy (all)", pct(needle["dense"]), pct(needle["sparse"]),
                 f"sparse / dense {num(needle['sparse_over_dense'])}"])
    if "skipped" in ppl:
        rows.append(["perplexity", "-", "-", f"not measured: {ppl['skipped']}"])
    else:
        rows.append([f"perplexity ({ppl['docs']} docs x {ppl['seq_len']} tokens)", num(ppl["dense"]),
                     num(ppl["sparse"]), f"increase {signed_pct(ppl['rel_increase'])}"])
    for n, a in att.items():
        rows.append([f"block sparsity {length_label(n)} (all / streaming / retrieval)", "0%",
                     f"{pct(a.get('sparsity/mean'))} / {pct(a.get('sparsity/streaming/mean'))} / "
                     f"{pct(a.get('sparsity/retrieval/mean'))}", ""])
    for n, a in att.items():
        rows.append([f"attention recall {length_label(n)} (all / retrieval heads)", "100%",
                     f"{pct(a.get('recall/mean'))} / {pct(a.get('recall/retrieval/mean'))}", ""])
    for n, p in pre.items():
        rows.append([f"prefill {length_label(n)} (ms)", num(1000 * p["dense_s"], ".1f"), num(1000 * p["sparse_s"], ".1f"),
                     f"speedup {num(p['speedup'], '.2f')}x"])
    for n, k in kv.items():
        rows.append([f"KV cache {length_label(n)} ({ev['kv_cache']['dtype']}, per sequence)", human_bytes(k["dense_bytes"]),
                     human_bytes(k["sparse_bytes"]), f"{pct(k['fraction'])} of dense"])
    lines += table(["metric", "dense", "sparse", "note"], rows)
    lines += [f"Prefill: {ev['prefill']['device']}, backend {ev['prefill']['backend']}, median of "
              f"{ev['prefill']['runs']} runs.", ""]
    if "skipped" not in ppl:
        lines += ["Perplexity by position:", ""]
        lines += table(["positions", "tokens", "dense", "sparse", "increase"],
                       [[f"{b['start']}-{b['end'] - 1}", b["tokens"], num(b["dense_ppl"]), num(b["sparse_ppl"]),
                         signed_pct(b["rel_increase"])] for b in ppl["buckets"]])
    lines += ["Per layer (sparsity / recall of all heads; recall of the retrieval heads at the longest length):", ""]
    lines += per_layer_table(ev, run["plan"])
    return lines


def retrieval_heads(plan, layer: int):
    return len(plan["layers"][layer]["retrieval_kv_heads"]) if plan else None


def per_layer_table(ev: dict, plan) -> list[str]:
    att, last = ev["attention"]["by_length"], longest(ev)
    rows = []
    for i in range(ev["plan"]["num_layers"]):
        cells = [f"{pct(att[n].get(f'sparsity/layer{i}'))} / {pct(att[n].get(f'recall/layer{i}'))}" for n in att]
        rows.append([i, retrieval_heads(plan, i) if plan else "-", *cells,
                     pct(att.get(last, {}).get(f"recall/retrieval/layer{i}"))])
    return table(["layer", "retrieval KV heads", *(f"{length_label(n)} sparsity / recall" for n in att),
                  f"retrieval recall {length_label(last)}"], rows)


def ablation_section(runs: list[dict]) -> list[str]:
    lines = ["## Ablations", "",
             f"One row per run. The `short_*` runs share one {SHORT_NOTE}: "
             "compare them with `short_top_p`, not with `full`; the `full_*` runs have the full schedule: compare "
             "them with `full`. Needle ratio: sparse / dense accuracy over all "
             "prompts (worst length in brackets). Sparsity and recall at 8K (the longest length evaluated when 8K "
             "was not).", ""]
    rows = []
    for r in runs:
        ev = r["eval"]
        if not ev:
            rows.append([r["name"], f"{r['status']}: no evaluation", *["-"] * 8])
            continue
        n = target_length(ev) or longest(ev)
        a = ev["attention"]["by_length"].get(n, {})
        ratios = [v["sparse"] / v["dense"] for v in ev["needle"]["by_length"].values()
                  if not missing(v["dense"]) and v["dense"] > 0 and not missing(v["sparse"])]
        ppl = ev["perplexity"]
        t = targets(ev)
        rows.append([r["name"], r["status"],
                     f"{num(ev['needle']['sparse_over_dense'], '.2f')} ({num(min(ratios) if ratios else None, '.2f')})",
                     "-" if "skipped" in ppl else signed_pct(ppl['rel_increase']),
                     f"{pct(a.get('sparsity/mean'))}" + ("" if n == str(TARGET_LENGTH) else f" @{n}"),
                     f"{pct(a.get('recall/mean'))} / {pct(a.get('recall/retrieval/mean'))}",
                     r["recipe"]["sparsity"]["retrieval_fraction"], selection_label(r["recipe"]), steps_label(r["recipe"]),
                     ", ".join(f"{k} {v[0]}" for k, v in t.items())])
    return lines + table(["run", "status", "needle ratio", "ppl increase", "sparsity 8K", "recall 8K (all / retr.)",
                          "retrieval fraction", "selection / mode", "steps x grad accum", "targets"], rows)


def targets_section(run: dict) -> list[str]:
    lines = ["## Targets (full run)", "",
             f"Sparse needle accuracy >= {NEEDLE_RATIO:.0%} of dense at every length; perplexity increase <= "
             f"{PPL_INCREASE:.0%}; overall block sparsity >= {SPARSITY:.0%} at {TARGET_LENGTH} tokens.", ""]
    ev = run["eval"]
    if not ev:
        return lines + [f"Not assessed: the full run is {run['status']} (no evaluation).", ""]
    t = targets(ev)
    lines += table(["target", "result", "measured"],
                   [["needle >= 98% of dense, every length", *t["needle"]],
                    [f"perplexity increase <= {PPL_INCREASE:.0%}", *t["ppl"]],
                    [f"sparsity >= {SPARSITY:.0%} at {length_label(TARGET_LENGTH)}", *t["sparsity"]]])
    if not any(v[0] == "MISSED" for v in t.values()):
        return lines
    lines += ["Where to look (misses):", ""]
    n = target_length(ev) or longest(ev)
    att = ev["attention"]["by_length"].get(n, {})
    if t["needle"][0] == "MISSED":
        lengths, depths = ev["config"]["lengths"], ev["config"]["depths"]
        grid = ev["needle"]["grid"]
        for c, length in enumerate(lengths):
            cells = ", ".join(f"depth {d:g}: {pct(grid['sparse'][r][c], 0)} (dense {pct(grid['dense'][r][c], 0)})"
                              for r, d in enumerate(depths))
            lines.append(f"- needle, sparse by depth at {length_label(length)}: {cells}")
    if t["sparsity"][0] == "MISSED":
        lines.append(f"- sparsity at {length_label(n)}: streaming heads {pct(att.get('sparsity/streaming/mean'))}, "
                     f"retrieval heads {pct(att.get('sparsity/retrieval/mean'))} (window "
                     f"{run['recipe']['sparsity']['window']}, {selection_label(run['recipe'])})")
    layers = [(att.get(f"recall/layer{i}"), i) for i in range(ev["plan"]["num_layers"])]
    layers = sorted((r, i) for r, i in layers if not missing(r))[:5]
    retr = sorted((att[k], int(k.rsplit("layer", 1)[1])) for k in att
                  if k.startswith("recall/retrieval/layer") and not missing(att[k]))[:5]
    if retr:
        lines.append(f"- lowest retrieval-head recall at {length_label(n)}: "
                     + ", ".join(f"layer {i} {pct(r)}" for r, i in retr))
    lines += [f"- lowest-recall layers at {length_label(n)} tokens (all heads; per-layer table above):", ""]
    lines += table(["layer", "recall", "retrieval-head recall", "sparsity", "retrieval KV heads"],
                   [[i, pct(r), pct(att.get(f"recall/retrieval/layer{i}")), pct(att.get(f"sparsity/layer{i}")),
                     retrieval_heads(run["plan"], i) if run["plan"] else "-"] for r, i in layers])
    return lines


# ---------------------------------------------------------------- curves

def plot_curves(runs: list[dict], png_dir: Path) -> list[Path]:
    """One PNG per curve family: the full run on the left, the ablations overlaid on the right; dashed =
    indexer warm-up, solid = sparse training."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png_dir.mkdir(parents=True, exist_ok=True)
    full_schedule = [r for r in runs if r["name"].startswith("full") and r["rows"]]
    groups = [("full schedule", full_schedule),
              ("ablations (short schedule)", [r for r in runs if r not in full_schedule and r["rows"]])]
    groups = [(title, rs) for title, rs in groups if rs]
    colors = {r["name"]: f"C{i}" for i, r in enumerate(runs)}
    paths = []
    for stem, title, keys in CURVES:
        if not any(k in row for _, rs in groups for r in rs for row in r["rows"] for k in keys):
            continue
        fig, axes = plt.subplots(len(keys), len(groups), figsize=(6.5 * len(groups), 3.6 * len(keys)),
                                 squeeze=False)
        for col, (group, rs) in enumerate(groups):
            for row, key in enumerate(keys):
                ax = axes[row][col]
                for r in rs:
                    draw_run(ax, r, key, colors[r["name"]])
                ax.set_title(f"{group}: {key}", fontsize=10)
                ax.set_xlabel("global step")
                ax.grid(alpha=0.3)
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize=8)
        fig.suptitle(title)
        fig.tight_layout()
        path = png_dir / f"{stem}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def draw_run(ax, run: dict, key: str, color: str) -> None:
    labelled = False
    for stage in sorted({r["stage"] for r in run["rows"]}):
        pts = [(r["global_step"], r[key]) for r in run["rows"] if r["stage"] == stage and not missing(r.get(key))]
        if not pts or stage == "evaluate":
            continue
        label = None if labelled else run["name"] + ("" if run["status"] == "done" else f" ({run['status']})")
        ax.plot(*zip(*pts), color=color, linestyle="--" if "indexer_warmup" in stage else "-", linewidth=1.2,
                marker="o" if len(pts) < 20 else None, markersize=2.5, label=label)
        labelled = True


# ---------------------------------------------------------------- main

def build(root: Path, md: Path, png_dir: Path, notes: Path | None = None) -> str:
    runs = [load_run(root, r.name, r.note) for r in define_runs()]
    status = read_json(root / "status.json") or {}
    pngs = plot_curves(runs, png_dir)
    full = next(r for r in runs if r["name"] == "full")
    lines = header_section(runs, root)
    if notes is not None:  # the hand-written reading of the numbers below
        lines += ["## Reading", "", notes.read_text().strip(), ""]
    # Runs the driver was asked for (or that left a directory); the others were not selected for this
    # out-root (run.py --only) and are named once at the end.
    selected = [r for r in runs if r["name"] in status.get("runs", {}) or r["status"] != "not run"] or runs
    lines += runs_section(selected) + full_section(full) + targets_section(full)
    lines += ablation_section(selected) + diagnosis_section(root)
    lines += ["## Training curves", "",
              "From each run's metrics.jsonl (the scalars TensorBoard shows), x = global step; dashed = indexer "
              "warm-up, solid = sparse training. `short_no_warmup` has no warm-up, so its sparse stage starts at "
              "step 1.", ""]
    lines += [f"![{p.stem}]({os.path.relpath(p, md.parent)})" for p in pngs] or ["No metrics.jsonl found."]
    absent = [r["name"] for r in selected if r["status"] != "done"]
    lines += ["", "## Missing or unfinished runs", ""]
    lines += ([f"- `{n}`: {next(r['status'] for r in runs if r['name'] == n)}"
               + (f" (driver: {status['runs'][n]['state']})" if n in status.get("runs", {}) else "") for n in absent]
              or ["None: every selected run finished."])
    skipped = [r["name"] for r in runs if r not in selected]
    if skipped:
        lines += ["", "Not selected for this out-root: " + ", ".join(f"`{n}`" for n in skipped) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-root", type=Path, required=True, help="the --out-root of run.py")
    p.add_argument("--md", type=Path, default=Path("benchmarks/results/smollm2_rtpurbo.md"))
    p.add_argument("--png-dir", type=Path, default=Path("benchmarks/results/smollm2_rtpurbo"))
    p.add_argument("--notes", type=Path, help="a hand-written reading, inserted as the '## Reading' section")
    args = p.parse_args(argv)
    if not args.out_root.is_dir():
        print(f"no such directory: {args.out_root}", file=sys.stderr)
        return 2
    args.md.parent.mkdir(parents=True, exist_ok=True)
    args.md.write_text(build(args.out_root.resolve(), args.md.resolve(), args.png_dir.resolve(), args.notes))
    print(f"wrote {args.md} and {args.png_dir}/", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
