import itertools

import pytest
import torch

from rtpurbo_kernels.block_sparse_attn.layout import merge_head_blocks, streaming_block_index
from rtpurbo_train.attention.metrics import attention_recall, block_sparsity


@pytest.mark.parametrize("T,window,sink", [(300, 100, 4), (64, 64, 0), (513, 1000, 4), (200, 1, 70), (640, 128, 4)])
def test_streaming_blocks_match_brute_force(T, window, sink):
    bs = 64
    idx, cnt = streaming_block_index(T, window, sink, bs)
    for qb in range(-(-T // bs)):
        needed = set()
        for i in range(qb * bs, min(T, qb * bs + bs)):
            needed |= {j // bs for j in range(i + 1) if i - j < window or j < sink}
        got = idx[qb, : cnt[qb]].tolist()
        assert got == sorted(needed), (qb, got, sorted(needed))
        assert (idx[qb, cnt[qb]:] == -1).all()


def test_merge_puts_retrieval_rows_on_their_heads():
    stream = streaming_block_index(256, 64, 4, 64)
    r_idx = torch.tensor([[[[0, -1, -1], [0, 1, -1], [0, 1, 2], [0, 2, 3]]]], dtype=torch.int32)
    r_cnt = torch.tensor([[[1, 2, 3, 3]]], dtype=torch.int32)
    idx, cnt = merge_head_blocks(stream, (r_idx, r_cnt), torch.tensor([1]), batch=1, num_kv_heads=3)
    assert idx.shape == (1, 3, 4, 3)
    assert idx[0, 1].tolist() == r_idx[0, 0].tolist() and cnt[0, 1].tolist() == [1, 2, 3, 3]
    for h in (0, 2):
        assert idx[0, h, :, : stream[0].shape[1]].tolist() == stream[0].tolist()
        assert cnt[0, h].tolist() == stream[1].tolist()


def test_block_sparsity_counts_skipped_causal_blocks():
    cnt = torch.tensor([[[1, 1, 2, 2]]])  # 6 of the 10 causal blocks kept
    assert block_sparsity(cnt, 256, 64).item() == pytest.approx(0.4)


def test_recall_is_one_with_everything_visible_and_matches_brute_force_otherwise():
    torch.manual_seed(0)
    B, T, Hq, Hkv, D = 1, 192, 4, 2, 16
    q, k = torch.randn(B, T, Hq, D), torch.randn(B, T, Hkv, D)
    nqb = 3
    full = torch.tensor([list(range(qb + 1)) + [-1] * (nqb - qb - 1) for qb in range(nqb)], dtype=torch.int32)
    idx = full.expand(B, Hkv, nqb, nqb).contiguous()
    no_window = torch.zeros(Hkv, dtype=torch.int32)
    cnt = torch.arange(1, nqb + 1, dtype=torch.int32).expand(B, Hkv, nqb).contiguous()
    assert torch.allclose(attention_recall(q, k, idx, cnt, no_window, 0, 0.25, 64, 8), torch.ones(Hkv))

    window = torch.tensor([50, 0], dtype=torch.int32)
    idx2 = idx.clone()
    idx2[0, 1, 2] = torch.tensor([0, 2, -1], dtype=torch.int32)
    cnt2 = cnt.clone()
    cnt2[0, 1, 2] = 2
    rec = attention_recall(q, k, idx2, cnt2, window, 4, 0.25, 64, 8)
    rows = torch.linspace(T // 2, T - 1, steps=8).long().unique()
    expect = torch.zeros(Hkv)
    for h, g in itertools.product(range(Hkv), range(2)):
        total = 0.0
        for i in rows.tolist():
            p = (q[0, i, h * 2 + g] @ k[0, : i + 1, h].T * 0.25).softmax(-1)
            blocks = idx2[0, h, i // 64].tolist()
            keep = [j for j in range(i + 1) if j // 64 in blocks and (window[h] <= 0 or i - j < window[h] or j < 4)]
            total += p[keep].sum().item()
        expect[h] += total / len(rows) / 2
    torch.testing.assert_close(rec, expect, atol=1e-5, rtol=1e-5)
    assert rec[0] < 0.99 and rec[1] < 0.99


def test_merge_queues_without_host_sync(forbid_host_sync):
    stream = streaming_block_index(256, 64, 4, 64)
    r_idx = torch.tensor([[[[0, -1, -1], [0, 1, -1], [0, 1, 2], [0, 2, 3]]]], dtype=torch.int32)
    r_cnt = torch.tensor([[[1, 2, 3, 3]]], dtype=torch.int32)
    with forbid_host_sync():
        merge_head_blocks(stream, (r_idx, r_cnt), torch.tensor([1]), batch=1, num_kv_heads=3)
