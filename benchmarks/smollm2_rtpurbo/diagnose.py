"""Where does sparse needle accuracy go? Score the same needle prompts under selection variants that
each remove one source of error:

Every variant also scores the dense model (full attention, the reference) on the same prompts.
- `retrieval_full`: streaming heads sparse, retrieval heads attend to every block (top-p 1): the loss
  from the head split alone (calibration + window).
- `oracle`: retrieval heads choose blocks by top-p of their *true* attention mass (the indexer replaced
  by the layer's own RoPE'd q/k): the loss from top-p block selection with a perfect indexer.
- `indexer`: the model's indexers (what the sparse model runs).
- `oracle_window`, `indexer_window` (on request): as `oracle` / `indexer`, but retrieval heads also keep
  the sliding window (the selection's forced local blocks widened to cover it): tests whether heads that
  become retrieval heads lose accuracy by losing their window.
- `--query-strides 1 4 8 16`: every variant above runs once per selection query stride (rows named
  `indexer@s8`, ...), so the cheap strided selection can be compared with the exact one (stride 1) on the
  same prompts: needle accuracy, attention recall, sparsity and needle hit rate.

Per variant: needle accuracy by length, recall and sparsity (all heads / retrieval heads) by layer, and
for `oracle`/`indexer` the needle hit rate of every retrieval KV head: how often the block selection of
the query block that predicts the answer includes a block of the needle.
Then, in the dense model, each query head's attention mass from the answer positions onto the needle
tokens (`needle_heads`): which heads read the needle, and whether the plan made them retrieval heads.

    python benchmarks/smollm2_rtpurbo/diagnose.py --lengths 2048 4096 [--run-dir RUN]

Without `--run-dir` the model is the pretrained one, freshly calibrated (untrained random indexers: the
`indexer` row then shows the untrained starting point). With `--run-dir` (a pipeline run directory),
its exported model is diagnosed: the trained backbone (export/), its plan.json and trained indexers.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import rtpurbo_kernels
import torch

from rtpurbo_train.attention import attach_sparsity
from rtpurbo_train.attention.dispatch import attention_modules
from rtpurbo_train.attention.rope import rotate_half
from rtpurbo_train.calibration import calibrate
from rtpurbo_train.calibration.needle_echo_attention import (
    NeedleEchoProbe,
    needle_echo_attention,
)
from rtpurbo_train.config.stages import CalibrateStage
from rtpurbo_train.evaluation.needle_prompts import build_needle_prompts
from rtpurbo_train.evaluation.passes import score_needles
from rtpurbo_train.models.config import ModelConfig
from rtpurbo_train.models.loading import load_model
from rtpurbo_train.pipeline.stage_calibrate import calibration_documents
from rtpurbo_train.plan import SparsityPlan

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report_diagnosis import needle_head_lines  # noqa: E402

VARIANTS = ("retrieval_full", "oracle", "indexer", "oracle_window", "indexer_window")
DEFAULT_VARIANTS = VARIANTS[:3]


class OracleIndexer(torch.nn.Module):
    """Stands in for a layer's indexer: re-applies the layer's RoPE to the pre-RoPE q/k it is given, so
    block selection ranks blocks by the heads' true attention mass."""

    def __init__(self, attention_module):
        super().__init__()
        self.attention = [attention_module]  # a list: not a submodule
        self.scale = attention_module.head_dim ** -0.5

    def forward(self, q_pre, k_pre, q_rows=None, k_rows=None):
        cos, sin = self.attention[0].rtpurbo_rope  # [B, T, D]
        cos, sin = cos[:, :, None].to(q_pre.dtype), sin[:, :, None].to(q_pre.dtype)
        rope = lambda x: x * cos + rotate_half(x) * sin  # noqa: E731
        return rope(q_pre), rope(k_pre)


@contextmanager
def variant(model, runtime, name: str, query_stride: int | None = None):
    plan = runtime.plan
    saved_plan, swapped = plan, []
    if query_stride is not None:
        plan = runtime.plan = plan.model_copy(update={"query_stride": query_stride})
    if name.endswith("_window"):  # retrieval heads keep the streaming window (other variants: the plan's own)
        plan = runtime.plan = plan.model_copy(update={"retrieval_window": plan.window})
    if name == "retrieval_full":
        runtime.plan = plan.model_copy(update={"top_p": 1.0, "top_k": None})
    elif name.startswith("oracle"):
        for module in attention_modules(model):
            if hasattr(module, "indexer"):
                swapped.append((module, module.indexer))
                module.indexer = OracleIndexer(module)
    try:
        yield
    finally:
        runtime.plan = saved_plan
        for module, indexer in swapped:
            module.indexer = indexer


@contextmanager
def recorded_selections():
    """Record every `indexer_block_select` result (one per retrieval layer per sparse forward, in layer order)."""
    calls, original = [], rtpurbo_kernels.indexer_block_select

    def recording(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(tuple(t.detach().cpu() for t in out))
        return out

    rtpurbo_kernels.indexer_block_select = recording
    try:
        yield calls
    finally:
        rtpurbo_kernels.indexer_block_select = original


def needle_span(prompt) -> tuple[int, int] | None:
    """Token span of the needle value inside the prompt (the answer's tokens, without the leading space
    token when the prompt tokenises it apart)."""
    ids, answer = list(prompt.prompt_ids), list(prompt.answer_ids)
    for cand in (answer, answer[1:]):
        for start in range(len(ids) - len(cand), -1, -1) if cand else ():
            if ids[start:start + len(cand)] == cand:
                return start, start + len(cand)
    return None


def needle_hits(calls, prompts, plan, retrieval_layers) -> dict:
    """Per length and (layer, retrieval KV head): fraction of prompts whose answer-predicting query block
    selected a block holding the needle. `calls` holds len(retrieval_layers) selections per prompt."""
    if len(calls) != len(prompts) * len(retrieval_layers):
        raise RuntimeError(f"{len(calls)} recorded selections for {len(prompts)} prompts x {len(retrieval_layers)} layers")
    bs, hits, counts = plan.block_size, {}, {}
    for p_i, prompt in enumerate(prompts):
        span = needle_span(prompt)
        if span is None:
            continue
        qb = (len(prompt.prompt_ids) - 1) // bs
        needle_blocks = torch.arange(span[0] // bs, (span[1] - 1) // bs + 1)
        key = str(prompt.length)
        counts[key] = counts.get(key, 0) + 1
        for l_i, layer in enumerate(retrieval_layers):
            idx, cnt = calls[p_i * len(retrieval_layers) + l_i]
            for h_i, head in enumerate(plan.retrieval_kv_heads(layer)):
                chosen = idx[0, h_i, qb, :int(cnt[0, h_i, qb])].long()
                hit = bool(torch.isin(needle_blocks, chosen).any())
                row = hits.setdefault(key, {})
                row[f"{layer}.{head}"] = row.get(f"{layer}.{head}", 0) + hit
    return {n: {h: v / counts[n] for h, v in row.items()} for n, row in hits.items()}


@torch.no_grad()
def needle_heads(model, prompts, num_layers: int, num_q_heads: int, device) -> dict:
    """Per length: mean over prompts of each query head's attention mass from the answer-predicting
    positions onto the needle tokens, in the dense model: float lists [L][Hq]."""
    probe = NeedleEchoProbe(num_layers, num_q_heads)
    sums, counts = {}, {}
    with needle_echo_attention(model, probe):
        for prompt in prompts:
            span = needle_span(prompt)
            if span is None:
                continue
            ids = prompt.input_ids()
            start = len(prompt.prompt_ids) - 1
            probe.start_document(span, (start, start + len(prompt.answer_ids)))
            model(input_ids=ids[:, :start + len(prompt.answer_ids)].to(device), use_cache=False, logits_to_keep=1)
            key = str(prompt.length)
            sums[key] = sums.get(key, 0) + probe.document_scores()
            counts[key] = counts.get(key, 0) + 1
    return {n: (sums[n] / counts[n]).tolist() for n in sums}


def calibrated_plan(model, tokenizer, args) -> SparsityPlan:
    """Calibrate as the recipes' calibrate stage does (4 documents per length)."""
    stage = CalibrateStage(lengths=args.calibration_lengths, docs_per_length=4)
    docs = calibration_documents(tokenizer, stage, args.seed)
    settings = {"window": args.window, "sink_tokens": 4, "indexer_dim": 16, "top_p": args.top_p, "top_k": None}
    plan, _ = calibrate(model, docs, fraction=args.retrieval_fraction, plan_settings=settings)
    return plan


def load_indexers(model, export_dir: Path) -> str:
    """Copy the exported indexer weights into `model`."""
    from safetensors.torch import load_file
    path = export_dir / "rtpurbo_indexer.safetensors"
    if not path.is_file():
        raise SystemExit(f"{path} not found (run the export stage first)")
    state = load_file(str(path))
    own = {n: p for n, p in model.named_parameters() if ".indexer." in n}
    missing = sorted(set(own) - set(state))
    if missing:
        raise SystemExit(f"{path} has no weights for {missing[:3]} ...")
    with torch.no_grad():
        for n, p in own.items():
            p.copy_(state[n].to(p))
    return str(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--run-dir", type=Path, help="a pipeline run directory (plan.json + export/)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    ap.add_argument("--samples", type=int, default=2, help="prompts per (length, depth)")
    ap.add_argument("--calibration-lengths", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--retrieval-fraction", type=float, default=0.15)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=VARIANTS)
    ap.add_argument("--query-strides", type=int, nargs="+", default=None,
                    help="run each variant at these selection query strides (default: the plan's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    export_dir = args.run_dir / "export" if args.run_dir else None
    # The export is a plain Llama folder (the indexers live beside it) in the export dtype; compute in float32.
    model, tokenizer = load_model(ModelConfig(name_or_path=str(export_dir) if export_dir else args.model,
                                              dtype="float32"), device=args.device)
    model.eval()
    if export_dir:
        # The run's plan with the export's head order (export undoes any SP permutation and padding).
        plan = SparsityPlan.load(args.run_dir / "plan.json").model_copy(update={"kv_head_permutation": None})
        if plan.padded_kv_heads:
            plan = plan.without_padding()
    else:
        plan = calibrated_plan(model, tokenizer, args)
    runtime = attach_sparsity(model, plan, seed=args.seed)
    source = load_indexers(model, export_dir) if export_dir else "random init (untrained)"
    print(f"plan: {plan.num_retrieval_kv_heads()} retrieval KV heads; indexers: {source}", flush=True)

    prompts = build_needle_prompts(tokenizer, args.lengths, args.depths, args.samples, args.seed)
    results = {"command": shlex.join(["python", *sys.argv]), "device": str(args.device), "dtype": "float32",
               "num_kv_heads": plan.model.num_kv_heads, "window": plan.window, "top_p": plan.top_p,
               "indexers": source, "variants": {},
               "retrieval_heads": {str(i): plan.retrieval_kv_heads(i) for i in range(plan.model.num_layers)}}
    retrieval_layers = [i for i in range(plan.model.num_layers) if plan.retrieval_kv_heads(i)]
    runs = [(name, None) for name in args.variants] if not args.query_strides else \
        [(name, s) for name in args.variants for s in args.query_strides]
    for base_name, stride in runs:
        name = base_name if stride is None else f"{base_name}@s{stride}"
        t0 = time.perf_counter()
        with variant(model, runtime, base_name, stride), recorded_selections() as calls:
            records, by_length = score_needles(model, runtime, prompts, args.device, progress=False)
        row = {"dense": {}, "sparse": {}, "metrics": {str(n): m for n, m in by_length.items()}}
        if base_name != "retrieval_full":
            row["needle_hits"] = needle_hits(calls, prompts, plan, retrieval_layers)
        for n in args.lengths:
            cell = [r for r in records if r["length"] == n]
            row["dense"][str(n)] = sum(r["dense"] for r in cell) / len(cell)
            row["sparse"][str(n)] = sum(r["sparse"] for r in cell) / len(cell)
        results["variants"][name] = row
        print(f"{name:15s} " + "  ".join(
            f"{n}: dense {row['dense'][str(n)]:.0%} sparse {row['sparse'][str(n)]:.0%} "
            f"recall {by_length[n].get('recall/mean', float('nan')):.3f} "
            f"ret-recall {by_length[n].get('recall/retrieval/mean', float('nan')):.3f} "
            f"sparsity {by_length[n].get('sparsity/mean', float('nan')):.3f}" for n in args.lengths)
            + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
        for n, heads in row.get("needle_hits", {}).items():
            print(f"  needle hit rate {n}: mean {sum(heads.values()) / len(heads):.2f}; "
                  + " ".join(f"L{h}={v:.2f}" for h, v in heads.items()), flush=True)
    results["needle_heads"] = needle_heads(model, prompts, plan.model.num_layers, plan.model.num_q_heads, args.device)
    print("\n".join(needle_head_lines(results)), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
