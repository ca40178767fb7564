"""Triton forward of block-sparse attention: one program per (query-block tile, batch x KV head).

A program holds BLOCK_M packed rows (G query heads x query positions of one block, layout in
triton_common), walks the block's selected key blocks from block_idx, and keeps an online softmax
in float32 (base 2). Only (query block, key block) pairs that are partial (diagonal, window edge,
sink edge) pay for the element-wise mask: without a window only the diagonal can be partial, so the
loop splits into an unmasked run and a masked tail; with a window each block is tested.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import triton_common
from .triton_common import LOG2E, load_key_block, needs_token_mask, visible_pairs

# Globals read inside @triton.jit must be constexpr.
LN2_JIT = tl.constexpr(0.6931471805599453)


@triton.jit
def _fwd_attend_block(q, q_pos, m_i, l_i, acc, kb, k_base, v_base, stride_kt, stride_vt, T, qb, window, sink,
                      qk_scale_log2, MASK: tl.constexpr, BS: tl.constexpr, HEAD_DIM: tl.constexpr,
                      HAS_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One selected key block: scores, optional token mask, online-softmax update (base 2)."""
    s, k, v, k_pos = load_key_block(q, kb, k_base, v_base, stride_kt, stride_vt, T, qk_scale_log2, BS, HEAD_DIM,
                                    DOT_PRECISION)
    if MASK:
        s = tl.where(visible_pairs(q_pos[:, None], k_pos[None, :], window, sink, HAS_WINDOW), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # Rows with nothing visible yet keep max -inf; shift them by 0 so exp2 gives 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def block_sparse_attn_fwd_kernel(
    Q, K, V, O, LSE, BLOCK_IDX, BLOCK_CNT, KV_WINDOW,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    T, NUM_KV_HEADS, NQB, MAXB, sink, qk_scale_log2,
    G: tl.constexpr, BS: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
    HAS_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    TILES: tl.constexpr = (G * BS + BLOCK_M - 1) // BLOCK_M
    # Late query blocks select the most key blocks: launch them first for a better tail.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    qb = pid_m // TILES
    tile = pid_m % TILES
    pid_bh = tl.program_id(1)
    b = pid_bh // NUM_KV_HEADS
    h = pid_bh % NUM_KV_HEADS

    r = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    q_pos = qb * BS + r // G
    q_head = h * G + r % G
    row_ok = (r < G * BS) & (q_pos < T)
    d = tl.arange(0, HEAD_DIM)
    q_rows = b.to(tl.int64) * stride_qb + q_pos.to(tl.int64) * stride_qt + q_head.to(tl.int64) * stride_qh
    q = tl.load(Q + q_rows[:, None] + d[None, :], mask=row_ok[:, None], other=0.0)

    window = 0
    if HAS_WINDOW:
        window = tl.load(KV_WINDOW + h)
    sel = pid_bh.to(tl.int64) * NQB + qb
    cnt = tl.load(BLOCK_CNT + sel)
    idx_row = BLOCK_IDX + sel * MAXB
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if HAS_WINDOW:
        # Window edges and sink edges can fall anywhere in the list: decide per block.
        for i in range(0, cnt):
            kb = tl.load(idx_row + i)
            if needs_token_mask(qb, kb, window, sink, BS, HAS_WINDOW):
                m_i, l_i, acc = _fwd_attend_block(q, q_pos, m_i, l_i, acc, kb, k_base, v_base, stride_kt, stride_vt,
                                                  T, qb, window, sink, qk_scale_log2, True, BS, HEAD_DIM,
                                                  HAS_WINDOW, DOT_PRECISION)
            else:
                m_i, l_i, acc = _fwd_attend_block(q, q_pos, m_i, l_i, acc, kb, k_base, v_base, stride_kt, stride_vt,
                                                  T, qb, window, sink, qk_scale_log2, False, BS, HEAD_DIM,
                                                  HAS_WINDOW, DOT_PRECISION)
    else:
        # No window: the list is ascending, so only its tail (the diagonal block) can be partial.
        last = tl.load(idx_row + tl.maximum(cnt - 1, 0))
        n_full = tl.where((cnt > 0) & (last >= qb), cnt - 1, cnt)
        for i in range(0, n_full):
            kb = tl.load(idx_row + i)
            m_i, l_i, acc = _fwd_attend_block(q, q_pos, m_i, l_i, acc, kb, k_base, v_base, stride_kt, stride_vt,
                                              T, qb, window, sink, qk_scale_log2, False, BS, HEAD_DIM,
                                              HAS_WINDOW, DOT_PRECISION)
        for i in range(n_full, cnt):
            kb = tl.load(idx_row + i)
            m_i, l_i, acc = _fwd_attend_block(q, q_pos, m_i, l_i, acc, kb, k_base, v_base, stride_kt, stride_vt,
                                              T, qb, window, sink, qk_scale_log2, True, BS, HEAD_DIM,
                                              HAS_WINDOW, DOT_PRECISION)

    has_keys = l_i > 0.0
    acc = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, (m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0))) * LN2_JIT, float("-inf"))
    o_rows = b.to(tl.int64) * stride_ob + q_pos.to(tl.int64) * stride_ot + q_head.to(tl.int64) * stride_oh
    tl.store(O + o_rows[:, None] + d[None, :], acc.to(O.dtype.element_ty), mask=row_ok[:, None])
    lse_off = (b.to(tl.int64) * (NUM_KV_HEADS * G) + q_head) * T + q_pos
    tl.store(LSE + lse_off, lse, mask=row_ok)


def block_sparse_attn_fwd(q, k, v, block_idx, block_cnt, kv_window, sink_tokens, sm_scale, block_size, config=None):
    """q [B, T, Hq, D], k/v [B, T, Hkv, D] (last dim contiguous) -> o [B, T, Hq, D] (q.dtype), lse f32 [B, Hq, T].
    `config` overrides entries of triton_common.launch_config's choice (benchmarks sweep them)."""
    batch, seq_len, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_q_heads // num_kv_heads
    num_blocks = math.ceil(seq_len / block_size)
    cfg = triton_common.launch_config(group, block_size, head_dim, config)
    tiles = triton.cdiv(group * block_size, cfg["fwd_block_m"])
    o = triton_common.new_output(q.shape, q.dtype, q.device)
    lse = triton_common.new_output((batch, num_q_heads, seq_len), torch.float32, q.device)
    block_sparse_attn_fwd_kernel[(num_blocks * tiles, batch * num_kv_heads)](
        q, k, v, o, lse, block_idx, block_cnt, kv_window if kv_window is not None else block_cnt,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        seq_len, num_kv_heads, num_blocks, block_idx.shape[-1], sink_tokens, sm_scale * LOG2E,
        G=group, BS=block_size, BLOCK_M=cfg["fwd_block_m"], HEAD_DIM=head_dim,
        HAS_WINDOW=kv_window is not None, DOT_PRECISION=triton_common.dot_precision(q.dtype),
        num_warps=cfg["fwd_warps"], num_stages=cfg["fwd_stages"])
    return o, lse
