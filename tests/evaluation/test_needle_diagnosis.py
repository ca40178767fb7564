"""benchmarks/smollm2_rtpurbo/diagnose.py: the oracle indexer reproduces the true attention scores, the
needle span is found, and needle hit rates count what the selections hold."""
import sys
from pathlib import Path

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from rtpurbo_train.evaluation.needle_scoring import NeedlePrompt
from rtpurbo_train.plan import HeadLayout, SparsityPlan

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "smollm2_rtpurbo"))
import diagnose  # noqa: E402


class _Attention:
    head_dim = 16


def _rope(T, D, base=10000.0):
    inv = 1.0 / base ** (torch.arange(0, D, 2).float() / D)
    angles = torch.arange(T).float()[:, None] * inv[None]
    emb = torch.cat([angles, angles], -1)[None]  # [1, T, D]
    return emb.cos(), emb.sin()


def test_oracle_indexer_scores_are_the_attention_logits():
    torch.manual_seed(0)
    B, T, Hq, Hkv, D = 1, 37, 4, 2, 16
    cos, sin = _rope(T, D)
    q, k = torch.randn(B, Hq, T, D), torch.randn(B, Hkv, T, D)
    q_rope, k_rope = apply_rotary_pos_emb(q, k.repeat_interleave(Hq // Hkv, 1), cos, sin)  # transformers' RoPE
    attention = _Attention()
    attention.rtpurbo_rope = (cos, sin)
    oracle = diagnose.OracleIndexer(attention)
    qi, ki = oracle(q.transpose(1, 2), k.transpose(1, 2))  # pre-RoPE in, [B, T, H, D] layout
    group_k = ki.transpose(1, 2).repeat_interleave(Hq // Hkv, 1)
    scores = oracle.scale * qi.transpose(1, 2) @ group_k.transpose(-1, -2)
    expected = D ** -0.5 * q_rope @ k_rope.transpose(-1, -2)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)


def test_needle_span_finds_the_value_with_or_without_its_leading_space_token():
    prompt = NeedlePrompt(prompt_ids=(1, 5, 6, 7, 42, 43, 9, 5, 6), answer_ids=(42, 43), length=9, depth=0.5)
    assert diagnose.needle_span(prompt) == (4, 6)
    spaced = NeedlePrompt(prompt_ids=(1, 5, 42, 43, 9), answer_ids=(99, 42, 43), length=5, depth=0.5)
    assert diagnose.needle_span(spaced) == (2, 4)
    absent = NeedlePrompt(prompt_ids=(1, 5, 9), answer_ids=(42,), length=3, depth=0.5)
    assert diagnose.needle_span(absent) is None


def test_needle_hits_counts_selections_of_the_needle_block():
    plan = SparsityPlan.uniform(HeadLayout(num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=8), [1],
                                block_size=4)
    # 11 prompt tokens: the answer is predicted by position 10, query block 2; the needle sits at 5..6 (block 1).
    prompts = [NeedlePrompt(prompt_ids=(0, 0, 0, 0, 0, 7, 8, 0, 0, 0, 0), answer_ids=(7, 8), length=11, depth=0.5)] * 2
    nqb, maxb = 3, 3

    def selection(blocks):
        idx = torch.full((1, 1, nqb, maxb), -1, dtype=torch.int32)
        idx[0, 0, 2, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        cnt = torch.zeros(1, 1, nqb, dtype=torch.int32)
        cnt[0, 0, 2] = len(blocks)
        return idx, cnt

    # prompt 1: layer 0 picks blocks {0, 1} (hit), layer 1 {0, 2} (miss); prompt 2: both layers hit.
    calls = [selection([0, 1]), selection([0, 2]), selection([1, 2]), selection([1])]
    hits = diagnose.needle_hits(calls, prompts, plan, retrieval_layers=[0, 1])
    assert hits == {"11": {"0.1": 1.0, "1.1": 0.5}}
    with pytest.raises(RuntimeError, match="recorded selections"):
        diagnose.needle_hits(calls[:3], prompts, plan, retrieval_layers=[0, 1])
