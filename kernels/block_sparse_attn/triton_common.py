"""Pieces shared by the forward and backward Triton kernels: the visibility rule on a tile, the test
for whether a (query block, key block) pair needs token masking, the tile-shape choice, and output
allocation (tests switch `POISON_OUTPUTS` on so that any element a kernel fails to write stays NaN).

Row layout of a query tile: the G query heads of one KV head share a selection, so a tile packs
rows of one query block for all G heads. Flattened row r of the block (0 <= r < G * bs) is query
position qb * bs + r // G of query head h * G + r % G; in [B, T, Hq, D] memory the G heads of one
position are adjacent, so consecutive rows are (nearly) contiguous. A block's G * bs rows are
covered by ceil(G * bs / BLOCK_M) tiles.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

POISON_OUTPUTS = False

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def new_output(shape, dtype, device) -> torch.Tensor:
    """torch.empty, or NaN-filled when a test has set POISON_OUTPUTS."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def rows_per_tile(group: int, block_size: int, cap: int = 128) -> int:
    """Largest power of two <= cap dividing G * bs (at least 16), so tiles do not straddle blocks
    and no rows are wasted when G is not a power of two (G = 3: 3 tiles of 64 rows)."""
    rows = group * block_size
    tile = 16
    while tile * 2 <= cap and rows % (tile * 2) == 0:
        tile *= 2
    return tile


def launch_config(group: int, block_size: int, head_dim: int, overrides: dict | None = None) -> dict:
    """Tile rows, warps and pipeline stages of the three main kernels (fwd, dq, dkdv).
    Defaults: see benchmarks/notes_block_sparse_attn.md for the measurements behind them."""
    # Measured on one H200 at 64K tokens, 10% density, G=4, D=128 (notes_block_sparse_attn.md):
    # 64-row forward tiles with one warpgroup beat 128-row tiles with two (9.7 vs 10.6 ms); dQ prefers
    # 128 rows and 8 warps; dK/dV is fastest with 32-row steps and one warpgroup (19.6 vs 33.6 ms for
    # 64 rows and 8 warps, whose 64-key wgmma tiles do not split well over two warpgroups).
    config = {
        "fwd_block_m": rows_per_tile(group, block_size, cap=64), "fwd_warps": 4, "fwd_stages": 2,
        "dq_block_m": rows_per_tile(group, block_size), "dq_warps": 8 if head_dim >= 128 else 4, "dq_stages": 2,
        "dkdv_block_m": 32, "dkdv_warps": 4, "dkdv_stages": 2,
    }
    if overrides:
        unknown = set(overrides) - set(config)
        if unknown:
            raise ValueError(f"unknown launch config keys {sorted(unknown)}; valid: {sorted(config)}")
        config.update(overrides)
    return config


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs are for tests and references: keep them exact instead of TF32.
    return "ieee" if dtype == torch.float32 else "tf32"


def check_head_dim(head_dim: int) -> None:
    if head_dim not in (64, 128):
        raise ValueError(f"the Triton block-sparse attention kernels support head_dim 64 and 128, got {head_dim}; "
                         "use backend='reference' for other head sizes")


@triton.jit
def visible_pairs(q_pos, k_pos, window, sink, HAS_WINDOW: tl.constexpr):
    """The contract's token rule for broadcastable position tiles (the block rule is the caller's)."""
    vis = k_pos <= q_pos
    if HAS_WINDOW:
        vis = vis & ((window <= 0) | (q_pos - k_pos < window) | (k_pos < sink))
    return vis


@triton.jit
def needs_token_mask(qb, kb, window, sink, BS: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """False when every key of block kb is visible to every query of block qb, so the tile can skip
    the element-wise mask: strictly below the diagonal and (no window, or the whole block pair is
    inside the window, or the whole key block is sink)."""
    partial = kb >= qb
    if HAS_WINDOW:
        farthest = qb * BS + BS - 1 - kb * BS
        partial = partial | ((window > 0) & (farthest >= window) & (kb * BS + BS > sink))
    return partial


@triton.jit
def load_key_block(q, kb, k_base, v_base, stride_kt, stride_vt, T, qk_scale_log2, BS: tl.constexpr,
                   HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Key block kb of one KV head: its K and V tiles [BS, D] (keys past T read as 0), their positions, and
    the base-2 scores q K^T * scale * log2(e) of the query tile q [M, D] (the preamble of fwd and dQ)."""
    n = tl.arange(0, BS)
    d = tl.arange(0, HEAD_DIM)
    k_pos = kb * BS + n
    k_ok = k_pos < T
    k_off = k_pos.to(tl.int64)
    k = tl.load(k_base + k_off[:, None] * stride_kt + d[None, :], mask=k_ok[:, None], other=0.0)
    v = tl.load(v_base + k_off[:, None] * stride_vt + d[None, :], mask=k_ok[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
    return s, k, v, k_pos
