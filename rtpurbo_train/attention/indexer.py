"""The RTPurbo token indexer: 16-dim projections of the pre-RoPE query and key of retrieval heads.

Scores `s_h(m, n) = (Wq_h q_m)^T (Wk_g(h) k_n)`: Wq per retrieval query head, Wk per retrieval KV head
(METHOD.md, Decision 3). Weights are stored per head as `[H, d, D]` so that export can name them
`model.layers.{i}.self_attn.indexer.{wq,wk}.weight`.
"""
import math

import torch
from torch import nn


class HeadwiseProjection(nn.Module):
    """Applies one `[d, D]` matrix per head: x [B, T, H, D] -> [B, T, H, d]."""

    def __init__(self, num_heads: int, out_dim: int, in_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_heads, out_dim, in_dim))

    def forward(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """`rows`: use only these heads' matrices (x then holds just those heads)."""
        weight = self.weight if rows is None else self.weight.index_select(0, rows.to(self.weight.device))
        return torch.einsum("bthD,hdD->bthd", x, weight.to(x.dtype))


class Indexer(nn.Module):
    def __init__(self, num_q_heads: int, num_kv_heads: int, head_dim: int, dim: int = 16):
        super().__init__()
        if num_q_heads % num_kv_heads:
            raise ValueError(f"{num_q_heads} indexer query heads are not a multiple of {num_kv_heads} KV heads")
        self.group = num_q_heads // num_kv_heads
        self.dim = dim
        self.wq = HeadwiseProjection(num_q_heads, dim, head_dim)
        self.wk = HeadwiseProjection(num_kv_heads, dim, head_dim)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Random-sketch initialisation (Johnson-Lindenstrauss): Wk ~ N(0, s^2), and each query head
        starts with its KV head's matrix, so `scale_idx * (Wq q).(Wk k)` is an unbiased estimate of
        `scale_attn * q.k` on pre-RoPE vectors (s^2 = 1/sqrt(d*D) matches 1/sqrt(d) to 1/sqrt(D)).
        The warm-up stage then fits it to the real (RoPE'd) attention."""
        num_kv, d, head_dim = self.wk.weight.shape
        std = (d * head_dim) ** -0.25
        wk = torch.randn(num_kv, d, head_dim, generator=generator) * std
        self.wk.weight.copy_(wk.to(self.wk.weight))
        self.wq.weight.copy_(wk.repeat_interleave(self.group, dim=0).to(self.wq.weight))

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.dim)

    def forward(self, q_pre: torch.Tensor, k_pre: torch.Tensor, q_rows=None, k_rows=None):
        """q_pre [B, T, Hq_r, D], k_pre [B, T, Hkv_r, D] -> (qi [B, T, Hq_r, d], ki [B, T, Hkv_r, d]).
        `q_rows`/`k_rows`: the subset of heads given (a sequence-parallel rank's slice)."""
        return self.wq(q_pre, q_rows), self.wk(k_pre, k_rows)
