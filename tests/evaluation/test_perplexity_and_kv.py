"""Perplexity by position against direct cross-entropy, and KV-cache bytes against hand-computed values."""
import math

import pytest
import torch
import torch.nn.functional as F

from rtpurbo_train.evaluation import BucketedPerplexity, position_buckets, token_nll
from rtpurbo_train.evaluation.kv_cache import kv_cache_bytes
from rtpurbo_train.evaluation.passes import measure_perplexity, perplexity_documents
from rtpurbo_train.plan import HeadLayout, SparsityPlan

from .stubs import FakeRuntime, FixedLogitsLM


def test_position_buckets_cover_predicted_positions():
    assert position_buckets(9, 4) == [(1, 3), (3, 5), (5, 7), (7, 9)]
    assert position_buckets(11, 3) == [(1, 4), (4, 8), (8, 11)]
    assert position_buckets(3, 8) == [(1, 2), (2, 3)]  # capped at T - 1 buckets
    for T, n in [(2, 1), (100, 7), (1025, 8)]:
        b = position_buckets(T, n)
        assert b[0][0] == 1 and b[-1][1] == T and all(b[i][1] == b[i + 1][0] for i in range(len(b) - 1))
        assert all(e > s for s, e in b)
    with pytest.raises(ValueError):
        position_buckets(1, 4)
    with pytest.raises(ValueError):
        position_buckets(10, 0)


def _direct_bucket_ppl(logits, ids, start, end):
    """exp(mean CE) of the tokens at positions start..end-1 (predicted by positions start-1..end-2)."""
    V = logits.shape[-1]
    ce = F.cross_entropy(logits[:, start - 1:end - 1].reshape(-1, V).double(), ids[:, start:end].reshape(-1))
    return math.exp(float(ce))


def test_bucketed_perplexity_matches_direct_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    T, V = 37, 11
    docs = [torch.randint(0, V, (1, T), generator=gen) for _ in range(3)]
    logits = [3.0 * torch.randn(1, T, V, generator=gen) for _ in docs]
    acc = BucketedPerplexity(T, 5)
    for ids, lg in zip(docs, logits):
        nll = token_nll(lg, ids)
        assert nll.shape == (1, T - 1)
        acc.add(nll)
    all_ids, all_logits = torch.cat(docs), torch.cat(logits)
    for b in acc.buckets:
        assert b.tokens == 3 * (b.end - b.start)
        assert b.perplexity == pytest.approx(_direct_bucket_ppl(all_logits, all_ids, b.start, b.end), rel=1e-6)
    assert acc.perplexity == pytest.approx(_direct_bucket_ppl(all_logits, all_ids, 1, T), rel=1e-6)
    with pytest.raises(ValueError):
        acc.add(torch.zeros(1, T))


def test_measure_perplexity_dense_and_sparse_on_fixed_logits():
    gen = torch.Generator().manual_seed(1)
    T, V = 20, 9
    docs = [[d] + torch.randint(0, V, (T - 1,), generator=gen).tolist() for d in range(3)]  # first token = key
    table = {d: torch.randn(1, T, V, generator=gen) for d in range(3)}
    shift = torch.zeros(1, T, V)
    shift[0, T // 2:, 0] = 2.0  # sparse mode changes only the second half of the positions
    runtime = FakeRuntime()
    model = FixedLogitsLM(runtime, table, shift)
    out = measure_perplexity(model, runtime, docs, 4, torch.device("cpu"), progress=False)
    ids = torch.tensor(docs)
    for mode in ("dense", "sparse"):
        logits = torch.cat([model.logits_for(ids[i:i + 1], "sparse" if mode == "sparse" else "full") for i in range(3)])
        for b in out[mode].buckets:
            assert b.perplexity == pytest.approx(_direct_bucket_ppl(logits, ids, b.start, b.end), rel=1e-6)
    first = out["dense"].buckets[0]
    assert out["sparse"].buckets[0].perplexity == pytest.approx(first.perplexity, rel=1e-12)  # untouched half
    assert out["sparse"].buckets[-1].perplexity != pytest.approx(out["dense"].buckets[-1].perplexity, rel=1e-3)


class _CharTokenizer:
    def __call__(self, text):
        return {"input_ids": [ord(c) % 50 for c in text]}


def test_perplexity_documents_skip_short_texts_and_stop():
    texts = ["short", "a" * 12, "", None, "b" * 30, "c" * 10, "d" * 11]
    docs, read = perplexity_documents(_CharTokenizer(), iter(texts), 10, max_docs=2, scan_limit=100)
    assert docs == [[ord("a") % 50] * 10, [ord("b") % 50] * 10] and read == 5
    docs, read = perplexity_documents(_CharTokenizer(), iter(texts), 10, max_docs=5, scan_limit=3)
    assert len(docs) == 1 and read == 3


def test_kv_cache_bytes_hand_computed():
    layout = HeadLayout(num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=64)
    plan = SparsityPlan.uniform(layout, [1], window=100, sink_tokens=4)
    # dense: K and V x 2 layers x 2 KV heads x 64 dims x 2 bytes x 1000 tokens
    kv = kv_cache_bytes(plan, 1000, torch.float16)
    assert kv["dense_bytes"] == 2 * 2 * 2 * 64 * 2 * 1000 == 1_024_000
    # one retrieval KV head per layer keeps 1000 tokens, the streaming one 4 + 100; 256 bytes per head-token
    assert kv["sparse_bytes"] == 2 * 1000 * 256 + 2 * 104 * 256 == 565_248
    assert kv["fraction"] == pytest.approx(565_248 / 1_024_000)
    short = kv_cache_bytes(plan, 50, torch.float32)  # shorter than sink + window: nothing saved
    assert short["dense_bytes"] == short["sparse_bytes"] == 2 * 2 * 2 * 64 * 4 * 50
    with pytest.raises(ValueError):
        kv_cache_bytes(plan, 0, torch.float16)
