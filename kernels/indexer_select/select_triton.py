"""Triton block selection from block masses: the rule of `select.choose_blocks` for one row of NKB masses held in
registers, shared by the prefill selection (`select_rows_kernel`, here) and the decode step
(`sparse_decode/select_triton.py`).

`choose_in_registers`: the sink and local (window) blocks are forced; the other causal blocks (candidates) get
    unique int64 keys `mass bits << log2(NKB_P) | (NKB_P - 1 - kb)` (non-negative fp32 bits order like their
    values; equal masses rank by lower index, like the reference's stable sort), one descending `tl.sort` ranks
    them, `tl.cumsum(vals) - vals` is the candidate mass before each rank, compared with `top_p * total`
    (top-k: the rank), and the lightest kept key is the threshold: every candidate with a key >= it is kept.
`select_rows_kernel` grid (B * H * NQB,): one query block's row of `mass [B, H, NQB, NQB]` -> the chosen blocks
    compacted in ascending order into `block_idx [B, H, NQB, WIDTH]` (-1 padded) and `block_cnt [B, H, NQB]`,
    in one launch: no torch sort, cumsum, scatter or index sort over the NQB x NQB masses, no host sync.

Only the float summation order differs from the reference: a candidate whose mass-before is within ~1e-5 of
`top_p * total` may fall either way.
"""
import torch
import triton
import triton.language as tl

from ..layout import MAX_STATIC_WIDTH

# One row of NKB_P = next_pow2(NKB) int64 keys lives in registers: sm_90 holds 4096 at 16 warps without spills
# (kernels/sparse_decode/README.md); larger rows take the torch path.
MAX_ROW_BLOCKS = MAX_STATIC_WIDTH
# Tests switch this on: outputs start as garbage (-7 / NaN-like), so an entry left unwritten shows up.
POISON_OUTPUTS = False


@triton.jit
def choose_in_registers(mass, causal, forced, kb, top_p, top_k, NKB_P: tl.constexpr, LOG_NKB_P: tl.constexpr,
                        MODE: tl.constexpr):
    """chosen (bool [NKB_P]) of one row: MODE 1 top-p, MODE 2 top-k over the candidates (causal, not forced),
    plus the forced blocks. `mass` is fp32 >= 0 on the causal blocks (anything elsewhere)."""
    candidate = causal & (~forced)
    mass = tl.where(mass > 0.0, mass, 0.0)  # also -0.0 -> +0.0, so the bits order like the values
    bits = mass.to(tl.int32, bitcast=True).to(tl.int64)
    key = tl.where(candidate, (bits << LOG_NKB_P) | (NKB_P - 1 - kb).to(tl.int64), -1)
    ranked = tl.sort(key, descending=True)
    in_candidates = kb < tl.sum(candidate.to(tl.int32), 0)  # sorted position r holds a candidate
    if MODE == 1:
        vals = (ranked >> LOG_NKB_P).to(tl.int32).to(tl.float32, bitcast=True)
        vals = tl.where(in_candidates, vals, 0.0)
        before = tl.cumsum(vals, 0) - vals  # candidate mass ahead of sorted position r
        keep = in_candidates & ((before < top_p * tl.sum(vals, 0)) | (kb == 0))
    else:
        keep = in_candidates & (kb < top_k)
    threshold = tl.min(tl.where(keep, ranked, 0x7FFFFFFFFFFFFFFF), 0)
    return (candidate & (key >= threshold)) | forced


@triton.jit
def select_rows_kernel(
    MASS, IDX, CNT, NQB, WIDTH, top_p, top_k, sink_blocks, local_blocks,
    NKB_P: tl.constexpr, LOG_NKB_P: tl.constexpr, WIDTH_P: tl.constexpr, MODE: tl.constexpr,
):
    row = tl.program_id(0)  # (b * H + h) * NQB + qb
    qb = row % NQB
    kb = tl.arange(0, NKB_P)
    causal = kb <= qb  # qb < NQB, so also kb < NQB
    forced = causal & ((kb < sink_blocks) | (kb > qb - local_blocks))
    if MODE == 0:
        chosen = causal
    else:
        mass = tl.load(MASS + row.to(tl.int64) * NQB + kb, mask=causal, other=0.0)
        chosen = choose_in_registers(mass, causal, forced, kb, top_p, top_k, NKB_P, LOG_NKB_P, MODE)
    taken = chosen.to(tl.int32)
    count = tl.sum(taken, 0)
    out = IDX + row.to(tl.int64) * WIDTH
    slot = tl.cumsum(taken, 0) - 1  # ascending: slots follow the block order
    tl.store(out + slot, kb, mask=chosen & (slot < WIDTH))
    pad = tl.arange(0, WIDTH_P)
    tl.store(out + pad, tl.full([WIDTH_P], -1, tl.int32), mask=(pad >= count) & (pad < WIDTH))
    tl.store(CNT + row, count)


def select_warps(nkb_p: int) -> int:
    """Warps for one sorted row of nkb_p int64 keys: each thread holds <= 16 keys."""
    return max(4, min(16, nkb_p // 512))


def selection_mode(top_p, top_k) -> tuple[int, float, int]:
    """(MODE, top_p, top_k) constexpr/runtime values: 0 every causal block, 1 top-p, 2 top-k."""
    if top_k is not None:
        return 2, 0.0, int(top_k)
    if top_p >= 1.0:
        return 0, 1.0, 0
    return 1, float(top_p), 0


@torch.no_grad()
def select_blocks_triton(mass, *, top_p=0.9, top_k=None, sink_blocks=1, local_blocks=2, width):
    """Triton `select.select_blocks_from_mass`: mass float32 [B, H, NQB, NQB] -> (block_idx int32
    [B, H, NQB, width], block_cnt int32 [B, H, NQB]); `width` bounds every count (the caller's sync-free width).
    NQB <= MAX_ROW_BLOCKS."""
    B, H, nqb, nkb = mass.shape
    if nqb != nkb or nqb > MAX_ROW_BLOCKS:
        raise ValueError(f"select_blocks_triton takes square masses of at most {MAX_ROW_BLOCKS} blocks; got {tuple(mass.shape)}")
    mass = mass.float().contiguous()
    width = max(1, min(int(width), nqb))
    make = torch.full if POISON_OUTPUTS else (lambda shape, _, **kw: torch.empty(shape, **kw))
    block_idx = make((B, H, nqb, width), -7, dtype=torch.int32, device=mass.device)
    block_cnt = make((B, H, nqb), -7, dtype=torch.int32, device=mass.device)
    if B * H * nqb == 0:
        return block_idx, block_cnt
    mode, top_p, top_k = selection_mode(top_p, top_k)
    nkb_p = max(16, triton.next_power_of_2(nqb))
    select_rows_kernel[(B * H * nqb,)](
        mass, block_idx, block_cnt, nqb, width, top_p, top_k, int(sink_blocks), int(local_blocks),
        NKB_P=nkb_p, LOG_NKB_P=nkb_p.bit_length() - 1, WIDTH_P=max(16, triton.next_power_of_2(width)), MODE=mode,
        num_warps=select_warps(nkb_p),
    )
    return block_idx, block_cnt
