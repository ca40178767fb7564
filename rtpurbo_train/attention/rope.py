"""Recover pre-RoPE query/key vectors inside the attention function.

transformers hands the attention function RoPE'd q/k. The indexer works on pre-RoPE vectors (RTPurbo),
so we undo the rotation with the layer's own cos/sin: RoPE rotates each pair by +theta,
`x_rot = x*cos + rotate_half(x)*sin`, hence `x = x_rot*cos - rotate_half(x_rot)*sin`. For Qwen3 this
yields the q_norm/k_norm outputs, which is what the rotation was applied to.
"""
import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def undo_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D] RoPE'd; cos/sin [B, T, D] as the model computed them. Returns [B, H, T, D]."""
    if cos.shape[-1] != x.shape[-1]:
        raise ValueError(f"partial rotary embeddings (rotary dim {cos.shape[-1]} < head dim {x.shape[-1]}) are not supported")
    cos = cos.unsqueeze(1).to(x.dtype)
    sin = sin.unsqueeze(1).to(x.dtype)
    return x * cos - rotate_half(x) * sin
