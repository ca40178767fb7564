"""Loss shares and metric reduction across ranks.

Under sequence parallelism every rank returns its SHARE of the micro-batch loss, never a mean of its
own: LM/distillation = (sum over its tokens) / (valid tokens of the whole sequence, counted over the SP
group); indexer KL / SSA alignment = (mean over its heads) x (its fraction of the heads). The shares of
an SP group add up to exactly the SP=1 loss, and DeepSpeed (given Ulysses' mpu) sums gradients over the
SP group and averages over data parallel (it divides by world / SP), so the gradients equal SP=1's at
any gradient accumulation. (Averaging per-rank means instead weights tokens of half-empty shards up,
and making every rank's loss the whole loss multiplies the gradients by SP: the two known pitfalls.)
"""
from __future__ import annotations

import torch

from .. import distributed as dist

IGNORE_INDEX = -100


def shifted_targets(batch: dict) -> torch.Tensor:
    """Next-token targets aligned with the positions of `input_ids`, [B, T]: `shift_labels` as the
    Ulysses loader adapter makes them (already shifted across shard boundaries), or `labels[:, 1:]`
    with IGNORE at the last position."""
    if "shift_labels" in batch:
        return batch["shift_labels"]
    labels = batch["labels"]
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def group_valid_count(targets: torch.Tensor, sp) -> torch.Tensor:
    """Valid targets of the whole (sharded) micro-batch: this rank's count summed over the SP group."""
    count = (targets != IGNORE_INDEX).sum().to(torch.float32)
    return sp.all_reduce_sum(count) if sp is not None else count


def reduce_metrics(loss_sums: dict[str, float], measured: dict[str, float], *, dp_world: int, device) -> dict[str, float]:
    """Across all ranks: loss shares are summed and divided by the number of data-parallel groups
    (the sum over an SP group is the group's loss); measured metrics (sparsity, recall, throughput
    inputs) are averaged over the ranks that have them. Ranks may hold different metric keys (an SP
    rank without retrieval heads in a layer has no retrieval metrics there)."""
    local = {**{f"L{k}": v for k, v in loss_sums.items()}, **{f"M{k}": v for k, v in measured.items()}}
    keys = sorted(local)
    if dist.world_size() > 1:
        gathered: list = [None] * dist.world_size()
        torch.distributed.all_gather_object(gathered, keys)
        keys = sorted(set().union(*gathered))
    values = [local.get(k, 0.0) for k in keys] + [1.0 if k in local else 0.0 for k in keys]
    reduced = dist.all_reduce_sum(values, device)
    sums, counts = reduced[:len(keys)], reduced[len(keys):]
    out = {}
    for key, total, n in zip(keys, sums, counts):
        out[key[1:]] = total / dp_world if key[0] == "L" else total / max(n, 1.0)
    return out
