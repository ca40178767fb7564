"""Triton kernels for the indexer block masses (the heavy part of `indexer_block_select`).

Two passes, never T x T in memory:
  `indexer_row_lse_kernel`    grid (NQB, B * Hq): streams key blocks 0..qb with an online
                              logsumexp -> lse2 float32 [B, Hq, T] (base 2, scaled scores).
  `indexer_block_mass_kernel` grid (NQB, B * Hkv): for every key block kb <= qb and every query head
                              of the group, sums exp2(s2 - lse2) over the tile -> mass[b, h, qb, kb].
Programs with the most key blocks (the last query blocks) are launched first, which evens the tail.
"""
import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# Launch settings per kernel (benchmarks/bench_indexer.py --sweep measures the alternatives on a GPU).
# block_mass uses 8 warps: its unrolled loop over the G heads spills at 4 warps for G = 8 (sm_90 build:
# 255 registers + 64 B stack at 4 warps, 191 registers and no stack at 8).
LAUNCH = {"row_lse": dict(num_warps=4, num_stages=3), "block_mass": dict(num_warps=8, num_stages=2)}


def dot_precision(dtype) -> str:
    """fp32 inputs get exact fp32 products (the default, tf32, would drop mantissa bits)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def upcast_for_interpreter(x) -> bool:
    """The CPU interpreter keeps bf16 as raw uint16 and its tl.dot multiplies those bits: off CUDA the
    kernels upcast tiles to fp32 before each dot (on the GPU the dots run in the input dtype)."""
    return x.device.type != "cuda"


def padded_dim(d: int) -> int:
    """tl.dot needs a power-of-two inner dimension of at least 16; smaller/odd dims are zero-padded."""
    return max(16, triton.next_power_of_2(d))


@triton.jit
def indexer_row_lse_kernel(
    Q, K, LSE,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    T, HQ, G, D, scale2,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    nqb = tl.cdiv(T, BLOCK)
    qb = nqb - 1 - tl.program_id(0)  # heavy (late) query blocks first
    bh = tl.program_id(1)
    b = bh // HQ
    h = bh % HQ
    hk = h // G
    offs_m = qb * BLOCK + tl.arange(0, BLOCK)
    offs_n0 = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = (Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
              + offs_m[:, None].to(tl.int64) * stride_qt + offs_d[None, :])
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < T) & (offs_d[None, :] < D), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh

    m_i = tl.full([BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK], tl.float32)
    for kb in range(0, qb + 1):
        offs_n = kb * BLOCK + offs_n0
        k = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_kt + offs_d[None, :],
                    mask=(offs_n[:, None] < T) & (offs_d[None, :] < D), other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale2
        # Only the diagonal block has keys past the query; key 0 of block kb <= qb keeps rows finite.
        s = tl.where(offs_n[None, :] <= offs_m[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
        m_i = m_new
    lse = m_i + tl.log2(l_i)
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, lse, mask=offs_m < T)


@triton.jit
def indexer_block_mass_kernel(
    Q, K, LSE, MASS,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    T, HQ, HKV, D, scale2,
    G: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    nqb = tl.cdiv(T, BLOCK)
    qb = nqb - 1 - tl.program_id(0)
    bh = tl.program_id(1)  # b * HKV + hk
    b = bh // HKV
    hk = bh % HKV
    offs_m = qb * BLOCK + tl.arange(0, BLOCK)
    offs_n0 = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < T
    n_valid = tl.minimum(T - qb * BLOCK, BLOCK)
    inv_count = 1.0 / (G * n_valid).to(tl.float32)
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    q_base = Q + b.to(tl.int64) * stride_qb + offs_m[:, None].to(tl.int64) * stride_qt + offs_d[None, :]
    q_mask = row_ok[:, None] & (offs_d[None, :] < D)
    lse_base = LSE + (b * HQ + hk * G).to(tl.int64) * T + offs_m
    mass_row = MASS + (bh.to(tl.int64) * nqb + qb) * nqb

    for kb in range(0, qb + 1):
        offs_n = kb * BLOCK + offs_n0
        k = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_kt + offs_d[None, :],
                    mask=(offs_n[:, None] < T) & (offs_d[None, :] < D), other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        kt = tl.trans(k)
        visible = (offs_n[None, :] <= offs_m[:, None]) & row_ok[:, None]
        total = tl.zeros([BLOCK], tl.float32)
        for g in tl.static_range(G):
            h = hk * G + g
            q = tl.load(q_base + h.to(tl.int64) * stride_qh, mask=q_mask, other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
            lse = tl.load(lse_base + g * T, mask=row_ok, other=0.0)
            s = tl.dot(q, kt, input_precision=DOT_PRECISION) * scale2
            # Mask before exp2: future keys may score high, and exp2 of them would overflow.
            p = tl.exp2(tl.where(visible, s, float("-inf")) - lse[:, None])
            total += tl.sum(p, 1)
        tl.store(mass_row + kb, tl.sum(total, 0) * inv_count)


def block_mass_triton(qi, ki, *, block_size=64, scale=None, out=None):
    """Triton block masses: qi [B, T, Hq, d], ki [B, T, Hkv, d] -> mass float32 [B, Hkv, NQB, NQB].

    Only entries kb <= qb are written (the rest keep whatever `out` held; the selection ignores them).
    `out` lets tests pass a NaN-filled buffer to check every causal entry is written.
    """
    B, T, Hq, d = qi.shape
    Hkv = ki.shape[2]
    G = Hq // Hkv
    nqb = triton.cdiv(T, block_size)
    if qi.stride(-1) != 1:
        qi = qi.contiguous()
    if ki.stride(-1) != 1:
        ki = ki.contiguous()
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    scale2 = float(scale) * LOG2E
    lse = torch.empty(B, Hq, T, dtype=torch.float32, device=qi.device)
    if out is None:
        out = torch.zeros(B, Hkv, nqb, nqb, dtype=torch.float32, device=qi.device)
    block_d = padded_dim(d)
    indexer_row_lse_kernel[(nqb, B * Hq)](
        qi, ki, lse,
        qi.stride(0), qi.stride(1), qi.stride(2),
        ki.stride(0), ki.stride(1), ki.stride(2),
        T, Hq, G, d, scale2,
        BLOCK=block_size, BLOCK_D=block_d, DOT_PRECISION=dot_precision(qi.dtype),
        UPCAST=upcast_for_interpreter(qi), **LAUNCH["row_lse"],
    )
    indexer_block_mass_kernel[(nqb, B * Hkv)](
        qi, ki, lse, out,
        qi.stride(0), qi.stride(1), qi.stride(2),
        ki.stride(0), ki.stride(1), ki.stride(2),
        T, Hq, Hkv, d, scale2,
        G=G, BLOCK=block_size, BLOCK_D=block_d, DOT_PRECISION=dot_precision(qi.dtype),
        UPCAST=upcast_for_interpreter(qi), **LAUNCH["block_mass"],
    )
    return out
