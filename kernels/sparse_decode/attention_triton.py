"""Triton decode attention (`decode_attention` on CUDA): flash-decoding split-K over a fixed-capacity cache.

`decode_attention_split_kernel` grid (B * H, splits): a program owns a contiguous run of key blocks of one
    (batch, KV head). With a block mask it first loads the run's mask bytes as one vector, drops the blocks
    not chosen and those starting at/after lengths[b], and compacts the rest into a list (tl.cumsum, a
    per-program scratch row); the loop then visits the chosen blocks only, so the K/V of a block left out
    are never loaded (the speed of the sparse step: only chosen blocks cross the memory bus) and the loop
    body has no data-dependent branch. The G query rows of the KV head are padded to ROWS >= 16 so QK^T
    and PV are tensor-core tl.dots (sub-tiles of at most 64 keys); an online softmax (float32, base 2)
    runs over the chosen blocks; the program writes its unnormalised partial (acc [G, D], max, sum).
`decode_attention_merge_kernel` grid (B * H * G): combines the splits of one query row (max over the
    splits' maxima, then the rescaled sums, in a fixed order: deterministic, no atomics) and writes
    out [B, H, G, D] in q.dtype; a row that saw no key gives 0.

The split count depends on (B, H, C, block_size) and the SM count only, never on lengths or the mask, so
the launch is CUDA-graph safe (`attention_splits`).
"""
import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
PROGRAMS_PER_SM = 4
# 2: at batch 1 with 2 KV heads and an 8K cache (128 blocks of 64) that is still 128 programs (~1 per SM).
MIN_BLOCKS_PER_SPLIT = 2
DEFAULT_SMS = 132  # H200 / H100 SXM; the real count is read from the device when it is CUDA
# A split compacts its chosen blocks in a [next_pow2(blocks per split)] register vector: cap its length.
MAX_BLOCKS_PER_SPLIT = 4096
SPLIT_TILE = 32  # splits merged per step of the merge kernel
# Tests switch this on: the output and the partials start as NaN, so an element left unwritten shows up.
POISON_OUTPUTS = False


def new_output(shape, dtype, device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def num_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SMS


def dot_precision(dtype) -> str:
    """fp32 inputs get exact fp32 products (tf32 would drop mantissa bits); bf16/fp16 use tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"


def upcast_for_interpreter(x) -> bool:
    """The CPU interpreter keeps bf16 as raw uint16 and its tl.dot multiplies those bits: off CUDA the
    kernel upcasts tiles to fp32 before each dot (on the GPU the dots run in the input dtype)."""
    return x.device.type != "cuda"


@triton.jit
def attend_block(q, m_i, l_i, acc, kb, length, k_base, v_base, stride_kc, stride_vc, scale2,
                 BS: tl.constexpr, KEYS: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 UPCAST: tl.constexpr):
    """Online-softmax update of the ROWS query rows with key block kb (in sub-tiles of KEYS slots, so one
    sub-tile of K and V is live at a time)."""
    offs_n0 = tl.arange(0, KEYS)
    offs_d = tl.arange(0, HEAD_DIM)
    for c in tl.static_range(BS // KEYS):
        offs_n = kb * BS + c * KEYS + offs_n0
        visible = offs_n < length
        kv_off = offs_n[:, None].to(tl.int64)
        # Masked loads: slots past the length may hold garbage (even NaN) in a preallocated cache.
        k = tl.load(k_base + kv_off * stride_kc + offs_d[None, :], mask=visible[:, None], other=0.0)
        v = tl.load(v_base + kv_off * stride_vc + offs_d[None, :], mask=visible[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale2
        s = tl.where(visible[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A sub-tile past the length leaves max -inf on a row that saw nothing yet: shift it by 0, not -inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def decode_attention_split_kernel(
    Q, K, V, LENGTHS, BLOCK_MASK, BLOCK_LIST, ACC, M, L,
    stride_qb, stride_qh, stride_qg,
    stride_kb, stride_kh, stride_kc,
    stride_vb, stride_vh, stride_vc,
    H, G, C, NB, BLOCKS_PER_SPLIT, NUM_SPLITS, scale2,
    BS: tl.constexpr, KEYS: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, SPLIT_P: tl.constexpr,
    HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    b = bh // H
    h = bh % H
    length = tl.minimum(tl.load(LENGTHS + b).to(tl.int32), C)
    offs_g = tl.arange(0, ROWS)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_g < G
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                + offs_g[:, None].to(tl.int64) * stride_qg + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh

    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    kb_start = sp * BLOCKS_PER_SPLIT
    # Blocks starting at/after the length hold no key: stop before them.
    kb_end = tl.minimum(tl.minimum(kb_start + BLOCKS_PER_SPLIT, NB), tl.cdiv(length, BS))
    if HAS_MASK:
        # Compact the split's chosen blocks into a list first (one vector load of the mask bytes), so the loop
        # below runs over chosen blocks only and has no data-dependent branch (no chain of one dependent
        # mask-byte load per block); the K/V of a block left out are never read.
        offs_b = tl.arange(0, SPLIT_P)
        kbs = kb_start + offs_b
        live = kbs < kb_end
        live = live & (tl.load(BLOCK_MASK + bh.to(tl.int64) * NB + kbs, mask=live, other=0) != 0)
        live_i = live.to(tl.int32)
        count = tl.sum(live_i, 0)
        list_row = BLOCK_LIST + (bh.to(tl.int64) * NUM_SPLITS + sp) * SPLIT_P
        tl.store(list_row + tl.cumsum(live_i, 0) - 1, kbs, mask=live)
        tl.debug_barrier()  # the list is read back by other threads of the program
        for i in range(0, count):
            kb = tl.load(list_row + i)
            m_i, l_i, acc = attend_block(q, m_i, l_i, acc, kb, length, k_base, v_base, stride_kc, stride_vc, scale2,
                                         BS, KEYS, HEAD_DIM, DOT_PRECISION, UPCAST)
    else:
        for kb in range(kb_start, kb_end):
            m_i, l_i, acc = attend_block(q, m_i, l_i, acc, kb, length, k_base, v_base, stride_kc, stride_vc, scale2,
                                         BS, KEYS, HEAD_DIM, DOT_PRECISION, UPCAST)

    part = (bh.to(tl.int64) * NUM_SPLITS + sp) * G + offs_g  # [ROWS] rows of ACC / M / L
    tl.store(ACC + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=row_ok[:, None])
    tl.store(M + part, m_i, mask=row_ok)
    tl.store(L + part, l_i, mask=row_ok)


@triton.jit
def decode_attention_merge_kernel(
    ACC, M, L, O, G, NUM_SPLITS,
    HEAD_DIM: tl.constexpr, SPLIT_TILE: tl.constexpr,
):
    row = tl.program_id(0)  # (b * H + h) * G + g: the row of O [B, H, G, D]
    bh = row // G
    g = row % G
    offs_s = tl.arange(0, SPLIT_TILE)
    offs_d = tl.arange(0, HEAD_DIM)
    base = bh.to(tl.int64) * NUM_SPLITS * G + g  # + sp * G
    m_all = tl.full([SPLIT_TILE], float("-inf"), tl.float32)
    for s0 in range(0, NUM_SPLITS, SPLIT_TILE):
        sp = s0 + offs_s
        m_all = tl.maximum(m_all, tl.load(M + base + sp * G, mask=sp < NUM_SPLITS, other=float("-inf")))
    m_max = tl.max(m_all, 0)
    # No split saw a key: every weight below is 0 and the row is 0.
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    l_sum = tl.zeros([SPLIT_TILE], tl.float32)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    for s0 in range(0, NUM_SPLITS, SPLIT_TILE):
        sp = s0 + offs_s
        ok = sp < NUM_SPLITS
        m = tl.load(M + base + sp * G, mask=ok, other=float("-inf"))
        l = tl.load(L + base + sp * G, mask=ok, other=0.0)
        a = tl.load(ACC + (base + sp * G)[:, None] * HEAD_DIM + offs_d[None, :], mask=ok[:, None], other=0.0)
        w = tl.exp2(m - m_max)
        l_sum += l * w
        acc += tl.sum(a * w[:, None], 0)
    denom = tl.sum(l_sum, 0)
    out = acc / tl.where(denom > 0.0, denom, 1.0)
    tl.store(O + row.to(tl.int64) * HEAD_DIM + offs_d, out.to(O.dtype.element_ty))


def attention_splits(B, H, num_blocks, device, num_splits=None):
    """(blocks per split, splits): ~PROGRAMS_PER_SM programs per SM over B * H * splits, each with at least
    MIN_BLOCKS_PER_SPLIT blocks; from the shapes alone (graph-safe). E.g. 132 SMs, bs 64: H=8, C=136K ->
    66 splits of 33 blocks; H=2, C=8K -> 64 splits of 2 blocks."""
    if num_splits is None:
        num_splits = min(triton.cdiv(PROGRAMS_PER_SM * num_sms(device), B * H),
                         triton.cdiv(num_blocks, MIN_BLOCKS_PER_SPLIT))
    num_splits = max(1, triton.cdiv(num_blocks, MAX_BLOCKS_PER_SPLIT), min(int(num_splits), num_blocks))
    per_split = triton.cdiv(num_blocks, num_splits)
    return per_split, triton.cdiv(num_blocks, per_split)


def split_launch(keys: int, head_dim: int) -> dict:
    """Warps / stages of the split kernel. sm_90 builds (bf16, G padded to 16 rows): a 64 x 128 K/V sub-tile
    at 4 warps needs 255 registers and spills; 8 warps hold it without spilling (see README.md)."""
    return dict(num_warps=8 if keys * head_dim >= 64 * 64 else 4, num_stages=2)


@torch.no_grad()
def decode_attention_triton(q, k, v, lengths, block_mask=None, *, block_size=64, scale=None, num_splits=None):
    """Triton `decode_attention_reference`: q [B, H, G, D], k/v [B, H, C, D] (fp16/bf16/fp32; any strides
    with a contiguous last dim, else copied), lengths int [B], block_mask bool [B, H, ceil(C / bs)] or None
    -> [B, H, G, D] in q.dtype. D a power of two in 16..256 (64 and 128 are tested); block_size a power of
    two >= 16. `num_splits` overrides the split count (tests, benchmarks)."""
    B, H, G, D = q.shape
    C = k.shape[2]
    bs = int(block_size)
    if bs < 16 or bs & (bs - 1):
        raise ValueError(f"block_size must be a power of two >= 16 (got {bs})")
    if D < 16 or D > 256 or D & (D - 1):
        raise ValueError(f"decode_attention_triton supports head dims that are powers of two in 16..256 "
                         f"(got {D}); use backend='reference'")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q, k, v must share one dtype of fp16/bf16/fp32; got {q.dtype}, {k.dtype}, {v.dtype}")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    nb = triton.cdiv(C, bs)
    if block_mask is not None:
        if block_mask.dtype != torch.bool:
            block_mask = block_mask != 0
        mask_u8 = block_mask.contiguous().view(torch.uint8)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    dev = q.device
    out = new_output((B, H, G, D), q.dtype, dev)
    if B * H * G == 0:
        return out
    per_split, splits = attention_splits(B, H, nb, dev, num_splits) if nb else (1, 1)
    acc = new_output((B * H, splits, G, D), torch.float32, dev)
    m = new_output((B * H, splits, G), torch.float32, dev)
    l = new_output((B * H, splits, G), torch.float32, dev)
    lengths = lengths.contiguous()
    keys = min(bs, 64)
    split_p = triton.next_power_of_2(per_split)
    # Scratch of the per-split chosen-block lists (entries below each split's count are always written first).
    block_list = torch.empty(B * H * splits * split_p if block_mask is not None else 1, dtype=torch.int32, device=dev)
    decode_attention_split_kernel[(B * H, splits)](
        q, k, v, lengths, mask_u8 if block_mask is not None else lengths, block_list, acc, m, l,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        H, G, C, nb, per_split, splits, scale * LOG2E,
        BS=bs, KEYS=keys, ROWS=max(16, triton.next_power_of_2(G)), HEAD_DIM=D, SPLIT_P=split_p,
        HAS_MASK=block_mask is not None, DOT_PRECISION=dot_precision(q.dtype), UPCAST=upcast_for_interpreter(q),
        **split_launch(keys, D),
    )
    decode_attention_merge_kernel[(B * H * G,)](
        acc, m, l, out, G, splits, HEAD_DIM=D, SPLIT_TILE=SPLIT_TILE, num_warps=4,
    )
    return out
