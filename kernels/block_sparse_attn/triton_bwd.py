"""Triton backward of block-sparse attention, FlashAttention-2 style, with no atomics:

1. `block_sparse_attn_bwd_preprocess_kernel`: delta[b, hq, t] = sum_d dO * O (float32).
2. `block_sparse_attn_bwd_kernel_dq`: like the forward, one program per packed query tile walks the
   selected key blocks; recomputes P = exp(s - lse) and accumulates dQ = sum (P * (dP - delta)) K.
3. `block_sparse_attn_bwd_kernel_dkdv`: one program per (key block, batch x KV head) walks the query
   blocks that selected it (reverse map, reverse_map.py) and every packed row tile of each, and
   accumulates dV = P^T dO and dK = dS^T Q over all G query heads of the group.
Probabilities use the forward's lse, so no softmax statistics are recomputed.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import triton_common
from .reverse_map import build_reverse_block_map
from .triton_common import LOG2E, load_key_block, needs_token_mask, visible_pairs


@triton.jit
def block_sparse_attn_bwd_preprocess_kernel(
    O, DO, DELTA, stride_ob, stride_ot, stride_oh, stride_dob, stride_dot, stride_doh,
    T, NUM_Q_HEADS, BLOCK_T: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    pid_bh = tl.program_id(1)
    b = pid_bh // NUM_Q_HEADS
    hq = pid_bh % NUM_Q_HEADS
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = t < T
    d = tl.arange(0, HEAD_DIM)
    t64 = t.to(tl.int64)
    o = tl.load(O + b.to(tl.int64) * stride_ob + hq * stride_oh + t64[:, None] * stride_ot + d[None, :],
                mask=ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + b.to(tl.int64) * stride_dob + hq * stride_doh + t64[:, None] * stride_dot + d[None, :],
                 mask=ok[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * T + t, tl.sum(o * do, 1), mask=ok)


@triton.jit
def _load_query_tile(Q, DO, LSE, DELTA, b, qb, r, T, NUM_Q_HEADS, h,
                     stride_qb, stride_qt, stride_qh, stride_dob, stride_dot, stride_doh,
                     G: tl.constexpr, BS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Packed rows r of query block qb: q, dO [rows, D], lse (base 2, +inf on absent rows so that
    P = 0 there), delta [rows], positions and validity."""
    q_pos = qb * BS + r // G
    q_head = h * G + r % G
    row_ok = (r < G * BS) & (q_pos < T)
    d = tl.arange(0, HEAD_DIM)
    q_rows = b.to(tl.int64) * stride_qb + q_pos.to(tl.int64) * stride_qt + q_head.to(tl.int64) * stride_qh
    do_rows = b.to(tl.int64) * stride_dob + q_pos.to(tl.int64) * stride_dot + q_head.to(tl.int64) * stride_doh
    q = tl.load(Q + q_rows[:, None] + d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + do_rows[:, None] + d[None, :], mask=row_ok[:, None], other=0.0)
    stat = (b.to(tl.int64) * NUM_Q_HEADS + q_head) * T + q_pos
    lse = tl.load(LSE + stat, mask=row_ok, other=float("inf"))
    # A row that saw nothing has lse -inf: +inf makes its P exactly 0 (it has no gradient).
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(DELTA + stat, mask=row_ok, other=0.0)
    return q, do, lse2, delta, q_pos, q_head, row_ok


@triton.jit
def _dq_block(q, do, lse2, delta, q_pos, dq, kb, k_base, v_base, stride_kt, stride_vt, T, window, sink,
              qk_scale_log2, MASK: tl.constexpr, BS: tl.constexpr, HEAD_DIM: tl.constexpr,
              HAS_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dQ contribution of one selected key block: dS = P * (dO V^T - delta), dQ += dS K."""
    s, k, v, k_pos = load_key_block(q, kb, k_base, v_base, stride_kt, stride_vt, T, qk_scale_log2, BS, HEAD_DIM,
                                    DOT_PRECISION)
    p = tl.math.exp2(s - lse2[:, None])
    if MASK:
        p = tl.where(visible_pairs(q_pos[:, None], k_pos[None, :], window, sink, HAS_WINDOW), p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)


@triton.jit
def block_sparse_attn_bwd_kernel_dq(
    Q, K, V, DO, LSE, DELTA, DQ, BLOCK_IDX, BLOCK_CNT, KV_WINDOW,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_dqb, stride_dqt, stride_dqh,
    T, NUM_KV_HEADS, NQB, MAXB, sink, qk_scale_log2, sm_scale,
    G: tl.constexpr, BS: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
    HAS_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    TILES: tl.constexpr = (G * BS + BLOCK_M - 1) // BLOCK_M
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    qb = pid_m // TILES
    tile = pid_m % TILES
    pid_bh = tl.program_id(1)
    b = pid_bh // NUM_KV_HEADS
    h = pid_bh % NUM_KV_HEADS
    r = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    q, do, lse2, delta, q_pos, q_head, row_ok = _load_query_tile(
        Q, DO, LSE, DELTA, b, qb, r, T, NUM_KV_HEADS * G, h,
        stride_qb, stride_qt, stride_qh, stride_dob, stride_dot, stride_doh, G, BS, HEAD_DIM)

    window = 0
    if HAS_WINDOW:
        window = tl.load(KV_WINDOW + h)
    sel = pid_bh.to(tl.int64) * NQB + qb
    cnt = tl.load(BLOCK_CNT + sel)
    idx_row = BLOCK_IDX + sel * MAXB
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if HAS_WINDOW:
        for i in range(0, cnt):
            kb = tl.load(idx_row + i)
            if needs_token_mask(qb, kb, window, sink, BS, HAS_WINDOW):
                dq = _dq_block(q, do, lse2, delta, q_pos, dq, kb, k_base, v_base, stride_kt, stride_vt, T, window,
                               sink, qk_scale_log2, True, BS, HEAD_DIM, HAS_WINDOW, DOT_PRECISION)
            else:
                dq = _dq_block(q, do, lse2, delta, q_pos, dq, kb, k_base, v_base, stride_kt, stride_vt, T, window,
                               sink, qk_scale_log2, False, BS, HEAD_DIM, HAS_WINDOW, DOT_PRECISION)
    else:
        last = tl.load(idx_row + tl.maximum(cnt - 1, 0))
        n_full = tl.where((cnt > 0) & (last >= qb), cnt - 1, cnt)
        for i in range(0, n_full):
            kb = tl.load(idx_row + i)
            dq = _dq_block(q, do, lse2, delta, q_pos, dq, kb, k_base, v_base, stride_kt, stride_vt, T, window,
                           sink, qk_scale_log2, False, BS, HEAD_DIM, HAS_WINDOW, DOT_PRECISION)
        for i in range(n_full, cnt):
            kb = tl.load(idx_row + i)
            dq = _dq_block(q, do, lse2, delta, q_pos, dq, kb, k_base, v_base, stride_kt, stride_vt, T, window,
                           sink, qk_scale_log2, True, BS, HEAD_DIM, HAS_WINDOW, DOT_PRECISION)

    d = tl.arange(0, HEAD_DIM)
    dq_rows = b.to(tl.int64) * stride_dqb + q_pos.to(tl.int64) * stride_dqt + q_head.to(tl.int64) * stride_dqh
    tl.store(DQ + dq_rows[:, None] + d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _dkdv_step(k, v, k_pos, dk, dv, step, REV_QBLK, Q, DO, LSE, DELTA, b, h, kb, T, NUM_Q_HEADS, window, sink,
               stride_qb, stride_qt, stride_qh, stride_dob, stride_dot, stride_doh, qk_scale_log2,
               MASK: tl.constexpr, TILES: tl.constexpr, G: tl.constexpr, BS: tl.constexpr, BLOCK_M: tl.constexpr,
               HEAD_DIM: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One (selecting query block, row tile) step: dV += P^T dO, dK += dS^T Q (transposed tiles)."""
    qb = tl.load(REV_QBLK + step // TILES)
    r = (step % TILES) * BLOCK_M + tl.arange(0, BLOCK_M)
    q, do, lse2, delta, q_pos, q_head, row_ok = _load_query_tile(
        Q, DO, LSE, DELTA, b, qb, r, T, NUM_Q_HEADS, h,
        stride_qb, stride_qt, stride_qh, stride_dob, stride_dot, stride_doh, G, BS, HEAD_DIM)
    s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale_log2     # [BS, BLOCK_M]
    p_t = tl.math.exp2(s_t - lse2[None, :])
    if MASK:
        p_t = tl.where(visible_pairs(q_pos[None, :], k_pos[:, None], window, sink, HAS_WINDOW), p_t, 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def block_sparse_attn_bwd_kernel_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, REV_PTR, REV_QBLK, KV_WINDOW,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_dkb, stride_dkt, stride_dkh,
    stride_dvb, stride_dvt, stride_dvh,
    T, NUM_KV_HEADS, NKB, sink, qk_scale_log2, sm_scale,
    G: tl.constexpr, BS: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
    HAS_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    TILES: tl.constexpr = (G * BS + BLOCK_M - 1) // BLOCK_M
    kb = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // NUM_KV_HEADS
    h = pid_bh % NUM_KV_HEADS
    n = tl.arange(0, BS)
    d = tl.arange(0, HEAD_DIM)
    k_pos = kb * BS + n
    k_ok = k_pos < T
    k_off = k_pos.to(tl.int64)
    k = tl.load(K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh + k_off[:, None] * stride_kt + d[None, :],
                mask=k_ok[:, None], other=0.0)
    v = tl.load(V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh + k_off[:, None] * stride_vt + d[None, :],
                mask=k_ok[:, None], other=0.0)
    window = 0
    if HAS_WINDOW:
        window = tl.load(KV_WINDOW + h)
    row = pid_bh.to(tl.int64) * NKB + kb
    start = tl.load(REV_PTR + row)
    end = tl.load(REV_PTR + row + 1)
    NUM_Q_HEADS = NUM_KV_HEADS * G

    dk = tl.zeros([BS, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BS, HEAD_DIM], dtype=tl.float32)
    # One flat loop over (selecting query block, row tile) steps keeps each loop simple to pipeline.
    if HAS_WINDOW:
        for step in range(start * TILES, end * TILES):
            qb = tl.load(REV_QBLK + step // TILES)
            if needs_token_mask(qb, kb, window, sink, BS, HAS_WINDOW):
                dk, dv = _dkdv_step(k, v, k_pos, dk, dv, step, REV_QBLK, Q, DO, LSE, DELTA, b, h, kb, T, NUM_Q_HEADS,
                                    window, sink, stride_qb, stride_qt, stride_qh, stride_dob, stride_dot, stride_doh,
                                    qk_scale_log2, True, TILES, G, BS, BLOCK_M, HEAD_DIM, HAS_WINDOW, DOT_PRECISION)
            else:
                dk, dv = _dkdv_step(k, v, k_pos, dk, dv, step, REV_QBLK, Q, DO, LSE, DELTA, b, h, kb, T, NUM_Q_HEADS,
                                    window, sink, stride_qb, stride_qt, stride_qh, stride_dob, stride_dot, stride_doh,
                                    qk_scale_log2, False, TILES, G, BS, BLOCK_M, HEAD_DIM, HAS_WINDOW, DOT_PRECISION)
    else:
        # No window: query blocks ascend, so only the first (the diagonal, qb == kb) can be partial.
        first = tl.load(REV_QBLK + start, mask=end > start, other=0)
        masked_end = tl.where((end > start) & (first <= kb), start + 1, start) * TILES
        for step in range(start * TILES, masked_end):
            dk, dv = _dkdv_step(k, v, k_pos, dk, dv, step, REV_QBLK, Q, DO, LSE, DELTA, b, h, kb, T, NUM_Q_HEADS,
                                window, sink, stride_qb, stride_qt, stride_qh, stride_dob, stride_dot, stride_doh,
                                qk_scale_log2, True, TILES, G, BS, BLOCK_M, HEAD_DIM, HAS_WINDOW, DOT_PRECISION)
        for step in range(masked_end, end * TILES):
            dk, dv = _dkdv_step(k, v, k_pos, dk, dv, step, REV_QBLK, Q, DO, LSE, DELTA, b, h, kb, T, NUM_Q_HEADS,
                                window, sink, stride_qb, stride_qt, stride_qh, stride_dob, stride_dot, stride_doh,
                                qk_scale_log2, False, TILES, G, BS, BLOCK_M, HEAD_DIM, HAS_WINDOW, DOT_PRECISION)

    dk_rows = b.to(tl.int64) * stride_dkb + h.to(tl.int64) * stride_dkh + k_off * stride_dkt
    dv_rows = b.to(tl.int64) * stride_dvb + h.to(tl.int64) * stride_dvh + k_off * stride_dvt
    tl.store(DK + dk_rows[:, None] + d[None, :], (dk * sm_scale).to(DK.dtype.element_ty), mask=k_ok[:, None])
    tl.store(DV + dv_rows[:, None] + d[None, :], dv.to(DV.dtype.element_ty), mask=k_ok[:, None])


def bwd_preprocess(o, do):
    """delta float32 [B, Hq, T] = rowsum(dO * O)."""
    batch, seq_len, num_q_heads, head_dim = o.shape
    delta = triton_common.new_output((batch, num_q_heads, seq_len), torch.float32, o.device)
    block_t = 64
    block_sparse_attn_bwd_preprocess_kernel[(triton.cdiv(seq_len, block_t), batch * num_q_heads)](
        o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
        seq_len, num_q_heads, BLOCK_T=block_t, HEAD_DIM=head_dim)
    return delta


def bwd_dq(do, q, k, v, lse, delta, block_idx, block_cnt, kv_window, sink_tokens, sm_scale, block_size, cfg):
    """dq [B, T, Hq, D] (q.dtype), walking each query tile's selected key blocks."""
    batch, seq_len, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_q_heads // num_kv_heads
    num_blocks = math.ceil(seq_len / block_size)
    dq = triton_common.new_output(q.shape, q.dtype, q.device)
    tiles = triton.cdiv(group * block_size, cfg["dq_block_m"])
    block_sparse_attn_bwd_kernel_dq[(num_blocks * tiles, batch * num_kv_heads)](
        q, k, v, do, lse, delta, dq, block_idx, block_cnt, kv_window if kv_window is not None else block_cnt,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        seq_len, num_kv_heads, num_blocks, block_idx.shape[-1], sink_tokens, sm_scale * LOG2E, sm_scale,
        G=group, BS=block_size, BLOCK_M=cfg["dq_block_m"], HEAD_DIM=head_dim, HAS_WINDOW=kv_window is not None,
        DOT_PRECISION=triton_common.dot_precision(q.dtype), num_warps=cfg["dq_warps"], num_stages=cfg["dq_stages"])
    return dq


def bwd_dkdv(do, q, k, v, lse, delta, rev_ptr, rev_qblk, kv_window, sink_tokens, sm_scale, block_size, cfg):
    """dk, dv [B, T, Hkv, D], walking each key block's reverse-map list of query blocks."""
    batch, seq_len, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_q_heads // num_kv_heads
    num_blocks = math.ceil(seq_len / block_size)
    dk = triton_common.new_output(k.shape, k.dtype, k.device)
    dv = triton_common.new_output(v.shape, v.dtype, v.device)
    block_sparse_attn_bwd_kernel_dkdv[(num_blocks, batch * num_kv_heads)](
        q, k, v, do, lse, delta, dk, dv, rev_ptr, rev_qblk, kv_window if kv_window is not None else rev_ptr,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2),
        seq_len, num_kv_heads, num_blocks, sink_tokens, sm_scale * LOG2E, sm_scale,
        G=group, BS=block_size, BLOCK_M=cfg["dkdv_block_m"], HEAD_DIM=head_dim, HAS_WINDOW=kv_window is not None,
        DOT_PRECISION=triton_common.dot_precision(q.dtype), num_warps=cfg["dkdv_warps"],
        num_stages=cfg["dkdv_stages"])
    return dk, dv


def block_sparse_attn_bwd(do, q, k, v, o, lse, block_idx, block_cnt, kv_window, sink_tokens, sm_scale,
                          block_size, config=None):
    """Gradients (dq, dk, dv) shaped like (q, k, v); all tensors have a contiguous last dim.
    `config` overrides entries of triton_common.launch_config's choice (benchmarks sweep them)."""
    group = q.shape[2] // k.shape[2]
    cfg = triton_common.launch_config(group, block_size, q.shape[-1], config)
    delta = bwd_preprocess(o, do)
    dq = bwd_dq(do, q, k, v, lse, delta, block_idx, block_cnt, kv_window, sink_tokens, sm_scale, block_size, cfg)
    rev_ptr, rev_qblk = build_reverse_block_map(block_idx, block_cnt, block_idx.shape[2])
    dk, dv = bwd_dkdv(do, q, k, v, lse, delta, rev_ptr, rev_qblk, kv_window, sink_tokens, sm_scale, block_size, cfg)
    return dq, dk, dv
