"""Triton kernels for the decode block selection (`decode_block_select` on CUDA): two launches, no host sync.

`decode_block_stats_kernel`  grid (B * H, key splits): a program takes a contiguous run of key blocks
    (clipped to the new token's block qb = pos // bs, read from the device), scores the G query rows
    (padded to ROWS >= 16 for tl.dot) against each key tile and writes, per (b, h, g, kb), the block's
    max score and sum of exp2(score - max) over its slots <= pos (base 2, scaled). This is the paper's
    per-block (max, sum) histogram: the only pass over the indexer keys, spread over the whole GPU.
`decode_block_select_kernel` grid (B * H): one program per row combines the NKB (max, sum) pairs into the
    softmax mass per block (summed over the G heads), adds the carry, normalises, writes new_carry, and
    selects the blocks in registers with `indexer_select.select_triton.choose_in_registers` (the prefill
    selection's rule: sink and local (window) blocks forced, a descending tl.sort of the other causal blocks'
    keys, a tl.cumsum against top_p x their total mass or the rank for top-k, the threshold key); never kb > qb.

Every launch grid and constexpr depends on shapes only (B, H, G, d, C, block_size); positions, carry and
the selection live on the device, so a decode step can be captured in a CUDA graph.
"""
import math

import torch
import triton
import triton.language as tl

from ..indexer_select.select_triton import choose_in_registers, select_warps, selection_mode

LOG2E = 1.4426950408889634
# The selection keeps a whole row of block masses in registers (and sorts it): NKB_P = next power of two of
# C // block_size. 8192 blocks = 512K tokens at block_size 64; above that use backend="reference".
MAX_BLOCKS = 8192
# Keys scored per loop step of the stats kernel (several blocks per tile when block_size < 128).
TILE_KEYS = 128
# Programs per SM the stats kernel aims for; the split count is a function of the shapes (graph-safe).
PROGRAMS_PER_SM = 4
DEFAULT_SMS = 132  # H200 / H100 SXM; the real count is read from the device when it is CUDA
# Tests switch this on: every buffer a kernel writes starts as NaN (True for `chosen`), so an element the
# kernels fail to write shows up.
POISON_OUTPUTS = False


def new_output(shape, dtype, device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, True if dtype == torch.bool else float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def num_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SMS


@triton.jit
def decode_block_stats_kernel(
    QI, IK, POS, BMAX, BSUM,
    stride_qb, stride_qh, stride_qg,
    stride_kb, stride_kh, stride_kc,
    H, G, D, NKB, BLOCKS_PER_SPLIT, scale2,
    BS: tl.constexpr, NB_TILE: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    b = bh // H
    h = bh % H
    t = tl.load(POS + b).to(tl.int32)
    qb = t // BS
    kb_start = sp * BLOCKS_PER_SPLIT
    # Blocks past qb are never read by the select kernel: skip them (their keys may be garbage).
    kb_end = tl.minimum(tl.minimum(kb_start + BLOCKS_PER_SPLIT, NKB), qb + 1)

    offs_g = tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(QI + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                + offs_g[:, None].to(tl.int64) * stride_qg + offs_d[None, :],
                mask=(offs_g[:, None] < G) & d_ok[None, :], other=0.0).to(tl.float32)
    TILE: tl.constexpr = NB_TILE * BS
    offs_n0 = tl.arange(0, TILE)
    offs_j = tl.arange(0, NB_TILE)
    k_base = IK + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    stat_rows = (bh.to(tl.int64) * G + offs_g[:, None]) * NKB
    row_ok = offs_g[:, None] < G
    for kb0 in range(kb_start, kb_end, NB_TILE):
        offs_n = kb0 * BS + offs_n0
        visible = offs_n <= t  # also < NKB * BS: t < C and blocks past qb are not visited
        k = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_kc + offs_d[None, :],
                    mask=visible[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        # fp32 scores with exact products: the selection compares masses against top_p, and this pass is
        # bandwidth-bound (d = 16), so tf32 would buy nothing.
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale2
        s = tl.where(visible[None, :], s, float("-inf"))
        s3 = tl.reshape(s, [ROWS, NB_TILE, BS])
        m = tl.max(s3, 2)  # [ROWS, NB_TILE]
        # A block of the tile past t has max -inf: shift it by 0 so its sum is 0, not NaN.
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        l = tl.sum(tl.exp2(s3 - m_safe[:, :, None]), 2)
        kbs = kb0 + offs_j
        out = stat_rows + kbs[None, :]
        ok = row_ok & (kbs[None, :] < NKB)
        tl.store(BMAX + out, m, mask=ok)
        tl.store(BSUM + out, l, mask=ok)


@triton.jit
def decode_block_select_kernel(
    BMAX, BSUM, CARRY, POS, CHOSEN, NEW_CARRY,
    stride_cb, stride_ch,
    H, NKB, S, top_p, top_k, sink_blocks, local_blocks,
    G: tl.constexpr, BS: tl.constexpr, NKB_P: tl.constexpr, LOG_NKB_P: tl.constexpr, MODE: tl.constexpr,
):
    # MODE 0: every causal block (top_p >= 1, no top_k); 1: top-p; 2: top-k.
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    t = tl.load(POS + b).to(tl.int32)
    qb = t // BS
    kb = tl.arange(0, NKB_P)
    causal = (kb <= qb) & (kb < NKB)

    # Softmax mass of the new token per key block, summed over the G query heads.
    own = tl.zeros([NKB_P], tl.float32)
    stat_base = bh.to(tl.int64) * G * NKB
    for g in tl.static_range(G):
        m = tl.load(BMAX + stat_base + g * NKB + kb, mask=causal, other=float("-inf"))
        l = tl.load(BSUM + stat_base + g * NKB + kb, mask=causal, other=0.0)
        # Block qb holds slot t itself, so the row max is finite.
        w = l * tl.exp2(m - tl.max(m, 0))
        own += w / tl.sum(w, 0)

    # The open block's earlier sampled queries (carry) exist only when t does not start a block.
    carry_ptrs = CARRY + b.to(tl.int64) * stride_cb + h.to(tl.int64) * stride_ch + kb
    base = tl.load(carry_ptrs, mask=causal & (t % BS != 0), other=0.0)
    total = base + own
    rows = (((t % BS) // S + 1) * G).to(tl.float32)
    mass = total / rows
    new_carry = tl.where(t % S == S - 1, total, base)
    row_out = bh.to(tl.int64) * NKB + kb
    tl.store(NEW_CARRY + row_out, new_carry, mask=kb < NKB)

    forced = causal & ((kb < sink_blocks) | (kb > qb - local_blocks))
    if MODE == 0:
        chosen = causal
    else:
        chosen = choose_in_registers(mass, causal, forced, kb, top_p, top_k, NKB_P, LOG_NKB_P, MODE)
    tl.store(CHOSEN + row_out, chosen.to(tl.uint8), mask=kb < NKB)


def select_launch(B, H, nkb, block_size, device, key_splits=None):
    """(NB_TILE, blocks per split, splits) of the stats kernel: enough programs to fill the GPU at batch 1,
    from the shapes alone."""
    nb_tile = max(1, TILE_KEYS // block_size)
    tiles = triton.cdiv(nkb, nb_tile)
    if key_splits is None:
        key_splits = triton.cdiv(PROGRAMS_PER_SM * num_sms(device), B * H)
    splits = max(1, min(tiles, int(key_splits)))
    tiles_per_split = triton.cdiv(tiles, splits)
    return nb_tile, tiles_per_split * nb_tile, triton.cdiv(tiles, tiles_per_split)


@torch.no_grad()
def decode_block_select_triton(qi, ikeys, pos, carry, *, block_size, top_p=0.9, top_k=None, sink_blocks=1,
                               local_blocks=2, scale=None, query_stride=1, key_splits=None):
    """Triton `decode_block_select_reference`: qi [B, H, G, d], ikeys [B, H, C, d] (any float dtype; last dim
    contiguous, else copied), pos int [B] (0 <= pos < C), carry float32 [B, H, NKB]
    -> (chosen bool [B, H, NKB], new_carry float32 [B, H, NKB]), both freshly allocated (carry may be reused
    by the caller for the next step). `key_splits` overrides the stats kernel's split count (tests)."""
    B, H, G, d = qi.shape
    C = ikeys.shape[2]
    bs, S = int(block_size), int(query_stride)
    if C % bs:
        raise ValueError(f"the cache capacity ({C}) must be a multiple of block_size ({bs})")
    if bs < 16 or bs & (bs - 1):
        raise ValueError(f"block_size must be a power of two >= 16 (got {bs})")
    if S < 1:
        raise ValueError(f"query_stride must be >= 1 (got {S})")
    nkb = C // bs
    if nkb > MAX_BLOCKS:
        raise ValueError(f"decode_block_select_triton keeps one row of C / block_size = {nkb} block masses in "
                         f"registers (at most {MAX_BLOCKS}); use a larger block_size or backend='reference'")
    if d > 256:
        raise ValueError(f"indexer head dim {d} > 256 is not supported by the Triton kernel")
    if qi.stride(-1) != 1:
        qi = qi.contiguous()
    if ikeys.stride(-1) != 1:
        ikeys = ikeys.contiguous()
    if carry.dtype != torch.float32 or carry.stride(-1) != 1:
        carry = carry.float().contiguous()
    pos = pos.contiguous()
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if top_k is not None and int(top_k) < 1:
        raise ValueError(f"top_k must be >= 1 (got {top_k})")
    if top_k is None and not top_p > 0.0:
        raise ValueError(f"top_p must be > 0 (got {top_p})")
    mode, top_p, top_k = selection_mode(top_p, top_k)

    dev = qi.device
    rows = max(16, triton.next_power_of_2(G))
    nb_tile, blocks_per_split, splits = select_launch(B, H, nkb, bs, dev, key_splits)
    bmax = new_output((B * H, G, nkb), torch.float32, dev)
    bsum = new_output((B * H, G, nkb), torch.float32, dev)
    decode_block_stats_kernel[(B * H, splits)](
        qi, ikeys, pos, bmax, bsum,
        qi.stride(0), qi.stride(1), qi.stride(2),
        ikeys.stride(0), ikeys.stride(1), ikeys.stride(2),
        H, G, d, nkb, blocks_per_split, scale * LOG2E,
        BS=bs, NB_TILE=nb_tile, ROWS=rows, BLOCK_D=max(16, triton.next_power_of_2(d)),
        num_warps=4, num_stages=2,
    )
    nkb_p = max(16, triton.next_power_of_2(nkb))
    chosen = new_output((B, H, nkb), torch.bool, dev)
    new_carry = new_output((B, H, nkb), torch.float32, dev)
    decode_block_select_kernel[(B * H,)](
        bmax, bsum, carry, pos, chosen.view(torch.uint8), new_carry,
        carry.stride(0), carry.stride(1),
        H, nkb, S, top_p, top_k, int(sink_blocks), int(local_blocks),
        G=G, BS=bs, NKB_P=nkb_p, LOG_NKB_P=nkb_p.bit_length() - 1, MODE=mode,
        num_warps=select_warps(nkb_p),
    )
    return chosen, new_carry
