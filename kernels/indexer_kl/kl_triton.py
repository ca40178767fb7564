"""Triton kernels for the fused indexer KL loss (forward and backward); no T x T tensor anywhere.

Forward, `indexer_kl_fwd_kernel`, grid (number of sampled query blocks, B * Hq): program p handles
query block qb = NQB-1 - p*S (S = query_block_stride; S = 1: every block) in one pass over the
visible key blocks with two online softmaxes (full scores from q, k; indexer scores from qi, ki).
It carries, per query row,
  running max/sum of both distributions, A = sum_n exp(s_full - max) * (s_full - s_idx), and the
  two "attention outputs" O_x = sum_n exp(s_x - max_x) * ki_n,
so at the end KL(m) = E_pfull[s_full - s_idx] - lse_full + lse_idx and, because
d KL(m) / d s_idx(m, n) = p_idx - p_full, dqi_m / scale = O_idx / l_idx - O_full / l_full:
the qi gradient comes out of the forward pass at the cost of two [64, d] accumulators. With S > 1
each program also writes KL = 0 and dqi = 0 on the S - 1 unsampled blocks below its own
(qb-1 .. max(qb-S+1, 0)), so every element of the [B, Hq, T] KL rows and of dqi is written, once, by
some program (the lse of unsampled rows are left unwritten: nothing reads them).

Backward, `indexer_kl_bwd_dk_kernel`, grid (NKB, B * Hkv): one program per key block and KV head
walks the G query heads of the group and, for each, the sampled query blocks that see it (dense:
the qb >= kb with qb = NQB-1 mod S, i.e. every qb >= kb when S = 1; sparse: the transposed selection
lists, built from a selection whose unsampled query blocks have count 0), recomputes p_full and
p_idx from the saved lse, and accumulates dki_n = sum_m (p_idx - p_full)(m, n) qi_m in registers.
No atomics: each program owns its key block, so results are deterministic and the group sum over
G heads is free.

All exponentials are base 2 (scores pre-multiplied by log2 e); saved lse are base 2.
"""

import torch
import triton
import triton.language as tl

from ..indexer_select.block_mass_triton import LOG2E, dot_precision, padded_dim, upcast_for_interpreter
from .naive import sampled_row_count
from .transpose_selection import query_blocks_per_key_block

LN2 = tl.constexpr(0.6931471805599453)  # a constexpr: jit code may read only constexpr globals
# Launch settings per kernel (benchmarks/bench_indexer.py --sweep measures the alternatives on a GPU).
LAUNCH = {"fwd": dict(num_warps=4, num_stages=3), "bwd_dk": dict(num_warps=4, num_stages=3)}


@triton.jit
def indexer_kl_fwd_kernel(
    Q, K, QI, KI, BIDX, BCNT, KL, LSE_F, LSE_I, DQ,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_qib, stride_qit, stride_qih,
    stride_kib, stride_kit, stride_kih,
    MAXB, T, HQ, G, D, DI, sm_scale2, scale2, QSTRIDE,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DI: tl.constexpr,
    SPARSE: tl.constexpr, NEED_DQ: tl.constexpr,
    SCORE_PRECISION: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    nqb = tl.cdiv(T, BLOCK)
    qb = nqb - 1 - tl.program_id(0) * QSTRIDE  # sampled query blocks, the most keys first
    bh = tl.program_id(1)
    b = bh // HQ
    h = bh % HQ
    hk = h // G
    offs_m = qb * BLOCK + tl.arange(0, BLOCK)
    offs_n0 = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DI)
    row_ok = offs_m < T
    rows64 = offs_m[:, None].to(tl.int64)

    qf = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + rows64 * stride_qt
                 + offs_d[None, :], mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    qi = tl.load(QI + b.to(tl.int64) * stride_qib + h.to(tl.int64) * stride_qih + rows64 * stride_qit
                 + offs_e[None, :], mask=row_ok[:, None] & (offs_e[None, :] < DI), other=0.0)
    if UPCAST:
        qf = qf.to(tl.float32)
        qi = qi.to(tl.float32)
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    ki_base = KI + b.to(tl.int64) * stride_kib + hk.to(tl.int64) * stride_kih
    # Selection lists are contiguous [B, Hkv, NQB, MAXB]: row (b, hk, qb) starts at list_row * MAXB.
    list_row = (b * (HQ // G) + hk).to(tl.int64) * nqb + qb
    x_base = list_row * MAXB

    m_f = tl.full([BLOCK], float("-inf"), tl.float32)
    l_f = tl.zeros([BLOCK], tl.float32)
    m_i = tl.full([BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK], tl.float32)
    acc_diff = tl.zeros([BLOCK], tl.float32)
    o_f = tl.zeros([BLOCK, BLOCK_DI], tl.float32)
    o_i = tl.zeros([BLOCK, BLOCK_DI], tl.float32)

    if SPARSE:
        n_blocks = tl.load(BCNT + list_row)
    else:
        n_blocks = qb + 1
    for j in range(0, n_blocks):
        if SPARSE:
            kb = tl.load(BIDX + x_base + j)
        else:
            kb = j
        offs_n = kb * BLOCK + offs_n0
        cols64 = offs_n[:, None].to(tl.int64)
        key_ok = offs_n[:, None] < T
        kf = tl.load(k_base + cols64 * stride_kt + offs_d[None, :], mask=key_ok & (offs_d[None, :] < D), other=0.0)
        kx = tl.load(ki_base + cols64 * stride_kit + offs_e[None, :], mask=key_ok & (offs_e[None, :] < DI),
                     other=0.0)
        if UPCAST:
            kf = kf.to(tl.float32)
            kx = kx.to(tl.float32)
        s_f = tl.dot(qf, tl.trans(kf), input_precision=SCORE_PRECISION) * sm_scale2
        s_i = tl.dot(qi, tl.trans(kx), input_precision=DOT_PRECISION) * scale2
        # Causal inside the block (valid rows see only keys < T); selected blocks past the diagonal
        # would see nothing and are guarded below.
        visible = offs_n[None, :] <= offs_m[:, None]
        diff = tl.where(visible, s_f - s_i, 0.0)
        s_f = tl.where(visible, s_f, float("-inf"))
        s_i = tl.where(visible, s_i, float("-inf"))

        m_f_new = tl.maximum(m_f, tl.max(s_f, 1))
        m_f_safe = tl.where(m_f_new == float("-inf"), 0.0, m_f_new)
        alpha_f = tl.exp2(m_f - m_f_safe)
        p_f = tl.exp2(s_f - m_f_safe[:, None])
        l_f = l_f * alpha_f + tl.sum(p_f, 1)
        acc_diff = acc_diff * alpha_f + tl.sum(p_f * diff, 1)
        m_f = m_f_new

        m_i_new = tl.maximum(m_i, tl.max(s_i, 1))
        m_i_safe = tl.where(m_i_new == float("-inf"), 0.0, m_i_new)
        alpha_i = tl.exp2(m_i - m_i_safe)
        p_i = tl.exp2(s_i - m_i_safe[:, None])
        l_i = l_i * alpha_i + tl.sum(p_i, 1)
        m_i = m_i_new

        if NEED_DQ:
            kx32 = kx.to(tl.float32)
            o_f = o_f * alpha_f[:, None] + tl.dot(p_f, kx32, input_precision=DOT_PRECISION)
            o_i = o_i * alpha_i[:, None] + tl.dot(p_i, kx32, input_precision=DOT_PRECISION)

    empty = l_f == 0.0  # only a malformed selection (no block <= qb) leaves a row with no key
    l_f_safe = tl.where(empty, 1.0, l_f)
    l_i_safe = tl.where(empty, 1.0, l_i)
    lse_f = m_f + tl.log2(l_f_safe)
    lse_i = m_i + tl.log2(l_i_safe)
    kl = tl.where(empty, 0.0, LN2 * (acc_diff / l_f_safe - lse_f + lse_i))
    row_out = bh.to(tl.int64) * T + offs_m
    tl.store(KL + row_out, kl, mask=row_ok)
    # +inf lse makes the backward's probabilities exactly 0 on empty rows.
    tl.store(LSE_F + row_out, tl.where(empty, float("inf"), lse_f), mask=row_ok)
    tl.store(LSE_I + row_out, tl.where(empty, float("inf"), lse_i), mask=row_ok)
    if NEED_DQ:
        dq = o_i / l_i_safe[:, None] - o_f / l_f_safe[:, None]
        dq = tl.where(empty[:, None], 0.0, dq)
        dq_ptrs = DQ + ((b.to(tl.int64) * T + rows64) * HQ + h) * DI + offs_e[None, :]
        tl.store(dq_ptrs, dq, mask=row_ok[:, None] & (offs_e[None, :] < DI))

    # Query-block subsampling: the unsampled blocks qb-1 .. max(qb-QSTRIDE+1, 0) below this one belong
    # to this program; their rows contribute KL = 0 and dqi = 0. Their lse stay unwritten: the backward
    # never reads them (the NaN-poisoned tests would catch it). All of them are full blocks (only the
    # sequence's last block, always sampled, can be partial); the mask is a guard.
    n_skip = tl.minimum(QSTRIDE - 1, qb)
    for z in range(0, n_skip):
        offs_z = (qb - 1 - z) * BLOCK + tl.arange(0, BLOCK)
        z_ok = offs_z < T
        tl.store(KL + bh.to(tl.int64) * T + offs_z, tl.zeros([BLOCK], tl.float32), mask=z_ok)
        if NEED_DQ:
            z64 = offs_z[:, None].to(tl.int64)
            dz_ptrs = DQ + ((b.to(tl.int64) * T + z64) * HQ + h) * DI + offs_e[None, :]
            tl.store(dz_ptrs, tl.zeros([BLOCK, BLOCK_DI], tl.float32), mask=z_ok[:, None] & (offs_e[None, :] < DI))


@triton.jit
def indexer_kl_bwd_dk_kernel(
    Q, K, QI, KI, QIDX, QCNT, LSE_F, LSE_I, DK,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_qib, stride_qit, stride_qih,
    stride_kib, stride_kit, stride_kih,
    MAXQ, T, HQ, HKV, D, DI, sm_scale2, scale2,
    G, QSTRIDE, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DI: tl.constexpr,
    SPARSE: tl.constexpr, SCORE_PRECISION: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    nqb = tl.cdiv(T, BLOCK)
    kb = tl.program_id(0)  # early key blocks are seen by the most query blocks: they go first
    bh = tl.program_id(1)  # b * HKV + hk
    b = bh // HKV
    hk = bh % HKV
    offs_n = kb * BLOCK + tl.arange(0, BLOCK)
    offs_m0 = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DI)
    cols64 = offs_n[:, None].to(tl.int64)
    key_ok = offs_n[:, None] < T
    kf = tl.load(K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh + cols64 * stride_kt
                 + offs_d[None, :], mask=key_ok & (offs_d[None, :] < D), other=0.0)
    kx = tl.load(KI + b.to(tl.int64) * stride_kib + hk.to(tl.int64) * stride_kih + cols64 * stride_kit
                 + offs_e[None, :], mask=key_ok & (offs_e[None, :] < DI), other=0.0)
    if UPCAST:
        kf = kf.to(tl.float32)
        kx = kx.to(tl.float32)
    kf_t = tl.trans(kf)
    kx_t = tl.trans(kx)
    list_row = bh.to(tl.int64) * nqb + kb  # transposed lists, contiguous [B, Hkv, NKB, MAXQ]
    x_base = list_row * MAXQ
    acc = tl.zeros([BLOCK, BLOCK_DI], tl.float32)

    if SPARSE:
        n_blocks = tl.load(QCNT + list_row)
    else:
        # Sampled query blocks are qb = NQB-1 (mod S); the first one >= kb, then every S-th up to NQB-1
        # (S = 1: kb, kb+1, ..., NQB-1). NQB-1 >= kb is always sampled, so there is at least one.
        qb_first = kb + (nqb - 1 - kb) % QSTRIDE
        n_blocks = (nqb - 1 - qb_first) // QSTRIDE + 1
    # Heads outer, query blocks inner: the pipelined (inner) loop then stages one head's tiles, not
    # G of them (a static G loop inside overflowed shared memory at G = 4, fp32, num_stages = 3).
    for g in range(0, G):
        h = hk * G + g
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        qi_base = QI + b.to(tl.int64) * stride_qib + h.to(tl.int64) * stride_qih
        lse_base = (b * HQ + h).to(tl.int64) * T
        for j in range(0, n_blocks):
            if SPARSE:
                qb = tl.load(QIDX + x_base + j)
            else:
                qb = qb_first + j * QSTRIDE
            offs_m = qb * BLOCK + offs_m0
            row_ok = offs_m < T
            rows64 = offs_m[:, None].to(tl.int64)
            visible = (offs_n[None, :] <= offs_m[:, None]) & row_ok[:, None]
            qf = tl.load(q_base + rows64 * stride_qt + offs_d[None, :],
                         mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
            qi = tl.load(qi_base + rows64 * stride_qit + offs_e[None, :],
                         mask=row_ok[:, None] & (offs_e[None, :] < DI), other=0.0)
            if UPCAST:
                qf = qf.to(tl.float32)
                qi = qi.to(tl.float32)
            lse_f = tl.load(LSE_F + lse_base + offs_m, mask=row_ok, other=float("inf"))
            lse_i = tl.load(LSE_I + lse_base + offs_m, mask=row_ok, other=float("inf"))
            s_f = tl.dot(qf, kf_t, input_precision=SCORE_PRECISION) * sm_scale2
            s_i = tl.dot(qi, kx_t, input_precision=DOT_PRECISION) * scale2
            p_f = tl.exp2(tl.where(visible, s_f, float("-inf")) - lse_f[:, None])
            p_i = tl.exp2(tl.where(visible, s_i, float("-inf")) - lse_i[:, None])
            ds = p_i - p_f  # d KL / d s_idx, up to the scale * grad / count factor
            acc += tl.dot(tl.trans(ds), qi.to(tl.float32), input_precision=DOT_PRECISION)

    dk_ptrs = DK + ((b.to(tl.int64) * T + cols64) * HKV + hk) * DI + offs_e[None, :]
    tl.store(dk_ptrs, acc, mask=key_ok & (offs_e[None, :] < DI))


def empty_buffer(*shape, device):
    """Output/scratch allocation (float32, uninitialised); tests replace it with NaN-filled buffers to
    prove that the kernels write every element they return."""
    return torch.empty(*shape, dtype=torch.float32, device=device)


def _launch_common(q, k, qi, ki, block_size):
    B, T, Hq, D = q.shape
    d = qi.shape[-1]
    return dict(
        strides=(q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                 qi.stride(0), qi.stride(1), qi.stride(2), ki.stride(0), ki.stride(1), ki.stride(2)),
        meta=dict(BLOCK=block_size, BLOCK_D=padded_dim(D), BLOCK_DI=padded_dim(d),
                  SCORE_PRECISION=dot_precision(q.dtype),
                  DOT_PRECISION=dot_precision(qi.dtype), UPCAST=upcast_for_interpreter(qi)),
    )


def kl_forward_triton(q, k, qi, ki, *, sm_scale, scale, block_idx, block_cnt, block_size, need_dq,
                      query_block_stride=1):
    """-> (kl_rows float32 [B, Hq, T], lse_full2, lse_idx2 float32 [B, Hq, T] (base 2),
    dq_partial float32 [B, T, Hq, d] = O_idx/l_idx - O_full/l_full, or None).

    Only the sampled query blocks (NQB-1, NQB-1-S, ...) are computed; rows of the other blocks come
    back with kl = 0 and dq_partial = 0 (written by the kernel: no extra pass) and unwritten lse
    (uninitialised: the backward reads only sampled rows)."""
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    d = qi.shape[-1]
    nqb = triton.cdiv(T, block_size)
    n_sampled = (nqb - 1) // query_block_stride + 1
    dev = q.device
    kl = empty_buffer(B, Hq, T, device=dev)
    lse_f = empty_buffer(B, Hq, T, device=dev)
    lse_i = empty_buffer(B, Hq, T, device=dev)
    dq = empty_buffer(B, T, Hq, d, device=dev) if need_dq else kl
    sparse = block_idx is not None
    if sparse:
        bidx, bcnt = block_idx.contiguous(), block_cnt.contiguous()
    else:
        bidx = bcnt = torch.zeros(1, dtype=torch.int32, device=dev)
    c = _launch_common(q, k, qi, ki, block_size)
    indexer_kl_fwd_kernel[(n_sampled, B * Hq)](
        q, k, qi, ki, bidx, bcnt, kl, lse_f, lse_i, dq,
        *c["strides"],
        bidx.shape[-1] if sparse else 1, T, Hq, Hq // Hkv, D, d, float(sm_scale) * LOG2E, float(scale) * LOG2E,
        query_block_stride, SPARSE=sparse, NEED_DQ=need_dq, **c["meta"], **LAUNCH["fwd"],
    )
    return kl, lse_f, lse_i, (dq if need_dq else None)


def kl_backward_dk_triton(q, k, qi, ki, lse_f, lse_i, *, sm_scale, scale, query_lists, block_size,
                          query_block_stride=1):
    """-> dki_partial float32 [B, T, Hkv, d] = sum over the group's heads and sampled queries of
    (p_idx - p_full)(m, n) qi_m. `query_lists` = (qidx, qcnt) from `query_blocks_per_key_block` (built
    from a selection that holds only sampled query blocks: `sampled_selection_counts`), or None for
    dense causal (the kernel then walks the sampled qb >= kb itself, from query_block_stride)."""
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    d = qi.shape[-1]
    nkb = triton.cdiv(T, block_size)
    dev = q.device
    dk = empty_buffer(B, T, Hkv, d, device=dev)
    sparse = query_lists is not None
    if sparse:
        qidx, qcnt = query_lists[0].contiguous(), query_lists[1].contiguous()
    else:
        qidx = qcnt = torch.zeros(1, dtype=torch.int32, device=dev)
    c = _launch_common(q, k, qi, ki, block_size)
    indexer_kl_bwd_dk_kernel[(nkb, B * Hkv)](
        q, k, qi, ki, qidx, qcnt, lse_f, lse_i, dk,
        *c["strides"],
        qidx.shape[-1] if sparse else 1, T, Hq, Hkv, D, d, float(sm_scale) * LOG2E, float(scale) * LOG2E,
        G=Hq // Hkv, QSTRIDE=query_block_stride, SPARSE=sparse, **c["meta"], **LAUNCH["bwd_dk"],
    )
    return dk


def sampled_selection_counts(block_cnt, query_block_stride):
    """block_cnt [B, Hkv, NQB] with the counts of unsampled query blocks (qb != NQB-1 mod S) set to 0,
    so `query_blocks_per_key_block` lists only sampled query blocks. On the device, no host sync."""
    nqb = block_cnt.shape[-1]
    qb = torch.arange(nqb, device=block_cnt.device)
    sampled = (nqb - 1 - qb) % query_block_stride == 0
    return torch.where(sampled, block_cnt, torch.zeros((), dtype=block_cnt.dtype, device=block_cnt.device))


class IndexerKLTriton(torch.autograd.Function):
    """Fused KL loss; gradients to qi and ki only (q, k are constants: their gradient is None)."""

    @staticmethod
    def forward(ctx, q, k, qi, ki, block_idx, block_cnt, sm_scale, scale, block_size, query_block_stride=1):
        need_grad = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        q, k, qi, ki = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, qi, ki))
        kl, lse_f, lse_i, dq = kl_forward_triton(
            q, k, qi, ki, sm_scale=sm_scale, scale=scale, block_idx=block_idx, block_cnt=block_cnt,
            block_size=block_size, need_dq=need_grad, query_block_stride=query_block_stride)
        B, T, Hq, _ = q.shape
        ctx.count = B * Hq * sampled_row_count(T, block_size, query_block_stride)  # = B * Hq * T at S = 1
        ctx.scale, ctx.sm_scale, ctx.block_size = scale, sm_scale, block_size
        ctx.query_block_stride = query_block_stride
        if need_grad:
            ctx.save_for_backward(q, k, qi, ki, lse_f, lse_i, dq, block_idx, block_cnt)
        return kl.sum() / ctx.count

    @staticmethod
    def backward(ctx, grad):
        q, k, qi, ki, lse_f, lse_i, dq, block_idx, block_cnt = ctx.saved_tensors
        coef = grad.float() * (ctx.scale / ctx.count)  # tensor: no host sync
        dqi = dki = None
        if ctx.needs_input_grad[2]:
            dqi = (dq * coef).to(qi.dtype)
        if ctx.needs_input_grad[3]:
            S = ctx.query_block_stride
            lists = None
            if block_idx is not None:
                cnt = block_cnt if S == 1 else sampled_selection_counts(block_cnt, S)
                lists = query_blocks_per_key_block(block_idx, cnt, triton.cdiv(q.shape[1], ctx.block_size))
            dk = kl_backward_dk_triton(q, k, qi, ki, lse_f, lse_i, sm_scale=ctx.sm_scale, scale=ctx.scale,
                                       query_lists=lists, block_size=ctx.block_size, query_block_stride=S)
            dki = (dk * coef).to(ki.dtype)
        return None, None, dqi, dki, None, None, None, None, None, None
