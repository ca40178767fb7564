"""evaluate() on a tiny random Llama: writes report.md, metrics.json, the PNGs and TensorBoard logs; with
window >= T and top_p = 1.0 the sparse model is the dense model, so every comparison must come out equal."""
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rtpurbo_train.attention import attach_sparsity
from rtpurbo_train.evaluation import evaluate
from rtpurbo_train.models import build_byte_tokenizer
from rtpurbo_train.plan import HeadLayout, SparsityPlan
from rtpurbo_train.synthetic import haystack_text
from rtpurbo_train.trainer.monitor import Monitor

LENGTHS, DEPTHS = [320, 448], [0.2, 0.8]


def _tiny_sparse_model(window: int, top_p: float):
    tok = build_byte_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    q_scores = torch.rand(2, 4, generator=torch.Generator().manual_seed(0)).tolist()
    plan = SparsityPlan.from_scores(HeadLayout.from_config(config), q_scores, 0.5, window=window, sink_tokens=4,
                                    top_p=top_p)
    runtime = attach_sparsity(model, plan, backend="reference")
    return model, tok, runtime, plan


def test_evaluate_writes_report_and_sparse_equals_dense(tmp_path):
    model, tok, runtime, plan = _tiny_sparse_model(window=4096, top_p=1.0)
    model.train()  # evaluate must switch to eval and back
    monitor = Monitor(tmp_path, tensorboard=True, progress=False)
    texts = ["too short"] + [haystack_text(n_chars=700, seed=s) for s in range(3)]
    out = tmp_path / "eval"
    results = evaluate(model, tok, runtime, plan, lengths=LENGTHS, depths=DEPTHS, samples_per_cell=1,
                       perplexity_texts=iter(texts), perplexity_len=256, perplexity_docs=2, perplexity_buckets=4,
                       timing_runs=1, out_dir=out, seed=0, monitor=monitor, global_step=7, progress=False)
    monitor.close()
    assert model.training and runtime.mode == "full" and not runtime.measure

    # files
    report = (out / "report.md").read_text()
    for heading in ("Needle accuracy", "Perplexity by position", "Sparsity and attention recall", "KV-cache size",
                    "Prefill time", "Sparsity plan"):
        assert heading in report
    assert results["prefill"]["warmup"] == 0 and "median of 1 runs without a warm-up run" in report  # CPU
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["needle"]["grid"] == results["needle"]["grid"]
    for name in ("accuracy_dense", "accuracy_sparse", "sparsity_vs_length", "recall_per_layer",
                 "perplexity_by_position", "retrieval_scores"):
        png = out / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["stage"] == "evaluate" and logged[-1]["global_step"] == 7
    assert logged[-1]["eval/needle/dense"] == results["needle"]["dense"]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))

    # sparse == dense: same verdict on every prompt, nothing skipped, all attention mass kept
    needle = results["needle"]
    assert needle["prompts_scored"] == len(LENGTHS) * len(DEPTHS)
    assert all(r["dense"] == r["sparse"] for r in needle["prompts"])
    assert needle["grid"]["dense"] == needle["grid"]["sparse"]
    for n in LENGTHS:
        metrics = results["attention"]["by_length"][str(n)]
        assert metrics["sparsity/mean"] == pytest.approx(0.0, abs=1e-9)
        assert metrics["recall/mean"] == pytest.approx(1.0, abs=1e-4)
        assert results["kv_cache"]["by_length"][str(n)]["fraction"] == 1.0  # window covers everything
        assert results["prefill"]["by_length"][str(n)]["dense_s"] > 0
    ppl = results["perplexity"]
    assert ppl["docs"] == 2 and ppl["texts_read"] == 3  # the short text was skipped
    assert ppl["rel_increase"] == pytest.approx(0.0, abs=1e-4)
    for b in ppl["buckets"]:
        assert b["sparse_ppl"] == pytest.approx(b["dense_ppl"], rel=1e-4)


def test_evaluate_sparse_pattern_is_measured_and_bad_arguments_raise(tmp_path):
    model, tok, runtime, plan = _tiny_sparse_model(window=64, top_p=0.5)
    results = evaluate(model, tok, runtime, plan, lengths=[448], depths=[0.5], samples_per_cell=1,
                       perplexity_texts=None, perplexity_len=256, timing_runs=1, out_dir=tmp_path, seed=1,
                       progress=False)
    metrics = results["attention"]["by_length"]["448"]
    assert 0.0 < metrics["sparsity/mean"] < 1.0 and metrics["sparsity/streaming/mean"] > 0.0
    assert 0.0 < metrics["recall/mean"] < 1.0
    assert results["kv_cache"]["by_length"]["448"]["fraction"] < 1.0
    assert "skipped" in results["perplexity"]
    assert "Not measured" in (tmp_path / "report.md").read_text()
    json.loads((tmp_path / "metrics.json").read_text())  # strict JSON (NaN written as null)

    common = dict(depths=[0.5], samples_per_cell=1, perplexity_texts=None, perplexity_len=256, out_dir=tmp_path)
    with pytest.raises(ValueError, match="lengths"):
        evaluate(model, tok, runtime, plan, lengths=[], **common)
    with pytest.raises(ValueError, match="depths"):
        evaluate(model, tok, runtime, plan, lengths=[448], **{**common, "depths": [1.5]})
    with pytest.raises(ValueError, match="samples_per_cell"):
        evaluate(model, tok, runtime, plan, lengths=[448], **{**common, "samples_per_cell": 0})
    other = SparsityPlan.uniform(HeadLayout(num_layers=3, num_q_heads=4, num_kv_heads=2, head_dim=64), [0])
    with pytest.raises(ValueError, match="sparsity plan was made for"):
        evaluate(model, tok, runtime, other, lengths=[448], **common)
