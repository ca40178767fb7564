"""Triton kernels for the indexer block masses (the heavy part of `indexer_block_select`).

Query stride S > 1 (the long-context setting): one kernel, `indexer_strided_block_mass_kernel`,
grid (NQB, B * Hkv). A program stacks the sampled rows of its query block for all G query heads of the
KV group into one [G * BLOCK/S, d] tile (one score product per key tile serves the whole group), sweeps
the key blocks 0..qb twice (online logsumexp, then exp2(s - lse) summed per key block) and writes
mass[b, h, qb, kb]. About S times fewer exponentials than the exact pair below, in one launch.

Query stride 1 (the exact oracle), two passes, never T x T in memory:
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
LAUNCH = {"row_lse": dict(num_warps=4, num_stages=3), "block_mass": dict(num_warps=8, num_stages=2),
          "strided": dict(num_warps=4, num_stages=2)}


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
def load_key_tile(k_base, offs_n, offs_d, stride_kt, T, D, UPCAST: tl.constexpr):
    """The [BLOCK, BLOCK_D] key tile at rows offs_n (zero past T and past the head dim D)."""
    k = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_kt + offs_d[None, :],
                mask=(offs_n[:, None] < T) & (offs_d[None, :] < D), other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    return k


@triton.jit
def causal_row_lse(q, k_base, pos, qb, stride_kt, T, D, scale2,
                   BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Base-2 logsumexp of each query row of the tile `q` (row i at position pos[i]) over the keys
    0..pos[i] of key blocks 0..qb: an online max/sum sweep. Key 0 keeps every row finite."""
    offs_n0 = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    m_i = tl.full([q.shape[0]], float("-inf"), tl.float32)
    l_i = tl.zeros([q.shape[0]], tl.float32)
    for kb in range(0, qb + 1):
        offs_n = kb * BLOCK + offs_n0
        k = load_key_tile(k_base, offs_n, offs_d, stride_kt, T, D, UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale2
        # Only the diagonal block has keys past a row's position.
        s = tl.where(offs_n[None, :] <= pos[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
        m_i = m_new
    return m_i + tl.log2(l_i)


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
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = (Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
              + offs_m[:, None].to(tl.int64) * stride_qt + offs_d[None, :])
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < T) & (offs_d[None, :] < D), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    lse = causal_row_lse(q, k_base, offs_m, qb, stride_kt, T, D, scale2, BLOCK, BLOCK_D, DOT_PRECISION, UPCAST)
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
        k = load_key_tile(k_base, offs_n, offs_d, stride_kt, T, D, UPCAST)
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


@triton.jit
def indexer_strided_block_mass_kernel(
    Q, K, MASS,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    T, HKV, D, scale2,
    G: tl.constexpr, STRIDE: tl.constexpr, R: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
    ROWS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # R = BLOCK // STRIDE: the sampled rows of a full block
    nqb = tl.cdiv(T, BLOCK)
    qb = nqb - 1 - tl.program_id(0)  # heavy (late) query blocks first
    bh = tl.program_id(1)  # b * HKV + hk
    b = bh // HKV
    hk = bh % HKV
    n_valid = tl.minimum(T - qb * BLOCK, BLOCK)
    n_rows = tl.cdiv(n_valid, STRIDE)  # sampled rows of this block (the last one ends at its last row)
    # Tile row i = (head g, sample r): query position qb * BLOCK + min(r * S + S - 1, n_valid - 1).
    offs_i = tl.arange(0, ROWS)
    g = offs_i // R
    r = offs_i % R
    row_ok = (g < G) & (r < n_rows)
    pos = qb * BLOCK + tl.minimum(r * STRIDE + STRIDE - 1, n_valid - 1)
    offs_n0 = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = (Q + b.to(tl.int64) * stride_qb + (hk * G + g)[:, None].to(tl.int64) * stride_qh
              + pos[:, None].to(tl.int64) * stride_qt + offs_d[None, :])
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    lse = causal_row_lse(q, k_base, pos, qb, stride_kt, T, D, scale2, BLOCK, BLOCK_D, DOT_PRECISION, UPCAST)
    # Padding rows get lse = +inf: their probabilities are exactly 0 in the second sweep.
    lse = tl.where(row_ok, lse, float("inf"))
    inv_count = 1.0 / (G * n_rows).to(tl.float32)
    mass_row = MASS + (bh.to(tl.int64) * nqb + qb) * nqb
    for kb in range(0, qb + 1):
        offs_n = kb * BLOCK + offs_n0
        k = load_key_tile(k_base, offs_n, offs_d, stride_kt, T, D, UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale2
        # Mask before exp2: future keys may score high, and exp2 of them would overflow.
        p = tl.exp2(tl.where(offs_n[None, :] <= pos[:, None], s, float("-inf")) - lse[:, None])
        tl.store(mass_row + kb, tl.sum(tl.sum(p, 1), 0) * inv_count)


def strided_rows_tile(group: int, block_size: int, query_stride: int) -> int:
    """Rows of the strided kernel's query tile: G * BLOCK/S, padded to a power of two >= 16 (tl.dot)."""
    return max(16, triton.next_power_of_2(group * (block_size // query_stride)))


def block_mass_triton(qi, ki, *, block_size=64, scale=None, out=None, query_stride=1):
    """Triton block masses: qi [B, T, Hq, d], ki [B, T, Hkv, d] -> mass float32 [B, Hkv, NQB, NQB].

    Only entries kb <= qb are written (the rest keep whatever `out` held; the selection ignores them).
    `out` lets tests pass a NaN-filled buffer to check every causal entry is written. `query_stride` S
    (a power of two <= block_size): average over the sampled rows of each block (README.md); 1 = exact.
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
    if out is None:
        out = torch.zeros(B, Hkv, nqb, nqb, dtype=torch.float32, device=qi.device)
    block_d = padded_dim(d)
    if query_stride > 1:
        indexer_strided_block_mass_kernel[(nqb, B * Hkv)](
            qi, ki, out,
            qi.stride(0), qi.stride(1), qi.stride(2),
            ki.stride(0), ki.stride(1), ki.stride(2),
            T, Hkv, d, scale2,
            G=G, STRIDE=query_stride, R=block_size // query_stride, BLOCK=block_size, BLOCK_D=block_d,
            ROWS=strided_rows_tile(G, block_size, query_stride), DOT_PRECISION=dot_precision(qi.dtype),
            UPCAST=upcast_for_interpreter(qi), **LAUNCH["strided"],
        )
        return out
    lse = torch.empty(B, Hq, T, dtype=torch.float32, device=qi.device)
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
