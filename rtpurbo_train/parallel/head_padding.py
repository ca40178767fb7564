"""Zero-weight KV heads, so that sequence parallelism can split a model whose head counts it cannot
(SmolLM2-135M: 9 query / 3 KV heads at SP 2 -> 12 / 4).

`pad_kv_heads` appends `extra` KV heads, each with its G query heads, after the last head of every
layer: zero q/k/v rows (and biases) and zero o_proj columns. A padded query head scores 0 against every
key and averages zero values, and o_proj ignores it, so the model computes exactly what it did. Its
gradients are exactly zero too (zero values -> zero output -> zero o_proj column gradients; zero o_proj
columns -> zero output gradient -> zero q/k/v gradients), so AdamW with weight decay keeps the padded
weights at zero and the padding stays exact through training. The plan marks padded heads as streaming
(`SparsityPlan.padded_kv_heads`); export removes them (`strip_kv_heads`).
"""
from __future__ import annotations

import torch
from torch import nn

from .validate import ulysses_can_split


def kv_heads_to_add(num_q_heads: int, num_kv_heads: int, sp: int) -> int:
    """The fewest KV heads (each with its query group) to append so that SP `sp` can split the model."""
    group = num_q_heads // num_kv_heads
    extra = 0
    while not ulysses_can_split((num_kv_heads + extra) * group, num_kv_heads + extra, sp):
        extra += 1
    return extra


def _fit(t: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """The first `size` entries of t along `dim`, zeros appended where t has fewer."""
    if size <= t.shape[dim]:
        return t.narrow(dim, 0, size).clone()
    pad = list(t.shape)
    pad[dim] = size - t.shape[dim]
    return torch.cat([t, t.new_zeros(pad)], dim)


def _resize_rows(linear: nn.Linear, rows: int) -> None:
    linear.weight = nn.Parameter(_fit(linear.weight.data, rows, 0), requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        linear.bias = nn.Parameter(_fit(linear.bias.data, rows, 0), requires_grad=linear.bias.requires_grad)
    linear.out_features = rows


def _resize_columns(linear: nn.Linear, columns: int) -> None:
    linear.weight = nn.Parameter(_fit(linear.weight.data, columns, 1), requires_grad=linear.weight.requires_grad)
    linear.in_features = columns


def resize_kv_heads(attention_modules: list[nn.Module], config, num_kv_heads: int, group: int, head_dim: int) -> None:
    """Set every layer to `num_kv_heads` KV heads (and `num_kv_heads * group` query heads): zero heads are
    appended, or the last heads removed. The config follows (head_dim becomes explicit)."""
    for attn in attention_modules:
        _resize_rows(attn.q_proj, num_kv_heads * group * head_dim)
        _resize_rows(attn.k_proj, num_kv_heads * head_dim)
        _resize_rows(attn.v_proj, num_kv_heads * head_dim)
        _resize_columns(attn.o_proj, num_kv_heads * group * head_dim)
    config.head_dim = head_dim  # before the head counts: hidden_size / heads no longer gives it
    config.num_attention_heads = num_kv_heads * group
    config.num_key_value_heads = num_kv_heads


def pad_kv_heads(attention_modules, config, extra: int, group: int, head_dim: int) -> None:
    resize_kv_heads(attention_modules, config, config.num_key_value_heads + extra, group, head_dim)


def strip_kv_heads(attention_modules, config, extra: int, group: int, head_dim: int) -> None:
    resize_kv_heads(attention_modules, config, config.num_key_value_heads - extra, group, head_dim)
