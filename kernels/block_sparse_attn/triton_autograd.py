"""autograd.Function tying the Triton forward (triton_fwd.py) to the Triton backward (triton_bwd.py)."""
from __future__ import annotations

import torch

from .triton_bwd import block_sparse_attn_bwd
from .triton_fwd import block_sparse_attn_fwd


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    # Kernels take strides for B, T, H but assume unit stride along D (16-byte vector loads).
    return x if x.stride(-1) == 1 else x.contiguous()


class BlockSparseAttentionFunction(torch.autograd.Function):
    """(q, k, v) -> (o, lse); lse is an output without gradient."""

    @staticmethod
    def forward(ctx, q, k, v, block_idx, block_cnt, kv_window, sink_tokens, sm_scale, block_size):
        q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
        block_idx, block_cnt = block_idx.contiguous(), block_cnt.contiguous()
        kv_window = kv_window.contiguous() if kv_window is not None else None
        o, lse = block_sparse_attn_fwd(q, k, v, block_idx, block_cnt, kv_window, sink_tokens, sm_scale, block_size)
        ctx.save_for_backward(q, k, v, o, lse, block_idx, block_cnt, kv_window)
        ctx.sink_tokens, ctx.sm_scale, ctx.block_size = sink_tokens, sm_scale, block_size
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, o, lse, block_idx, block_cnt, kv_window = ctx.saved_tensors
        dq, dk, dv = block_sparse_attn_bwd(_last_dim_contiguous(do), q, k, v, o, lse, block_idx, block_cnt,
                                           kv_window, ctx.sink_tokens, ctx.sm_scale, ctx.block_size)
        return dq, dk, dv, None, None, None, None, None, None


def block_sparse_attention_triton(q, k, v, block_idx, block_cnt, kv_window, sink_tokens, sm_scale, block_size):
    return BlockSparseAttentionFunction.apply(q, k, v, block_idx, block_cnt, kv_window, sink_tokens, sm_scale,
                                              block_size)
