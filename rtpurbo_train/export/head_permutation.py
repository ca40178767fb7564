"""Undo the KV-head permutation that sequence-parallel head balancing applied to the weights.

Convention (`SparsityPlan.kv_head_permutation`): `perm[i][s]` is the ORIGINAL KV head stored at slot s
of layer i's permuted weights; the plan's `retrieval_kv_heads` are original head numbers. In a permuted
model, KV slot s holds k/v rows of original head perm[s], query slot s*G+j holds query head perm[s]*G+j
(q rows, o_proj columns), and the indexer rows follow the retrieval heads in ascending SLOT order (the
permuted weights with the permuted plan are themselves a consistent model).
Export writes everything back in the original order, so the folder matches the plan without a permutation.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError


def _check(perm: list[list[int]], num_layers: int, num_kv_heads: int) -> None:
    if len(perm) != num_layers:
        raise UserError(f"plan.kv_head_permutation has {len(perm)} layers, the model {num_layers}")
    for i, p in enumerate(perm):
        if sorted(p) != list(range(num_kv_heads)):
            raise UserError(f"plan.kv_head_permutation layer {i} = {p} is not a permutation of range({num_kv_heads})")


def _rows(linear: nn.Linear, order: torch.Tensor, head_dim: int) -> None:
    """Reorder the output rows of `linear` head by head: new head h = old head order[h]."""
    rows = (order[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)
    linear.weight.data = linear.weight.data.index_select(0, rows)
    if linear.bias is not None:
        linear.bias.data = linear.bias.data.index_select(0, rows)


def _columns(linear: nn.Linear, order: torch.Tensor, head_dim: int) -> None:
    cols = (order[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)
    linear.weight.data = linear.weight.data.index_select(1, cols)


def undo_kv_head_permutation(attention_modules: list[nn.Module], indexer: dict[str, torch.Tensor],
                             retrieval_kv_heads: list[list[int]], perm: list[list[int]], group: int,
                             head_dim: int) -> None:
    """In place on the (CPU copy's) attention modules and the indexer tensors named
    `model.layers.{i}.self_attn.indexer.{wq,wk}.weight`."""
    _check(perm, len(attention_modules), len(perm[0]) if perm else 0)
    for i, attn in enumerate(attention_modules):
        p = perm[i]
        slot_of = {head: slot for slot, head in enumerate(p)}
        kv_order = torch.tensor([slot_of[h] for h in range(len(p))])  # original head h <- slot slot_of[h]
        q_order = (kv_order[:, None] * group + torch.arange(group)[None, :]).reshape(-1)
        _rows(attn.q_proj, q_order, head_dim)
        _rows(attn.k_proj, kv_order, head_dim)
        _rows(attn.v_proj, kv_order, head_dim)
        _columns(attn.o_proj, q_order, head_dim)

        retrieval = retrieval_kv_heads[i]
        if not retrieval:
            continue
        slots = sorted(slot_of[h] for h in retrieval)  # indexer row r <-> retrieval slot slots[r]
        row_of = torch.tensor([slots.index(slot_of[h]) for h in retrieval])
        prefix = f"model.layers.{i}.self_attn.indexer"
        indexer[f"{prefix}.wk.weight"] = indexer[f"{prefix}.wk.weight"].index_select(0, row_of)
        q_rows = (row_of[:, None] * group + torch.arange(group)[None, :]).reshape(-1)
        indexer[f"{prefix}.wq.weight"] = indexer[f"{prefix}.wq.weight"].index_select(0, q_rows)
