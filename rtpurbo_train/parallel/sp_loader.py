"""DeepSpeed's UlyssesSPDataLoaderAdapter around our training loader, resumable.

The adapter gathers one batch from each rank of the SP group and hands out, one micro step at a time,
every rank's shard of batch 0, then of batch 1, ... So under SP the underlying loader is sharded by
GLOBAL rank (dp_rank = rank, dp_world = world): the SP group works through its ranks' batches in turn,
which is the same stream of sequences an SP=1 run sees (the loader's draws are global, data/loader.py).

Resume: a checkpoint may fall between two refills. The state is the loader position before the last
refill plus how many micro-batches of it were consumed; loading replays the refill and skips those.
"""
from __future__ import annotations

from typing import Any

import torch


class WithPositionIds:
    """Iterator adding `position_ids` [B, T] = arange(T) (one document per sequence, right padded), which
    Ulysses needs before sharding so every shard keeps its global positions."""

    def __init__(self, batches):
        self.batches = iter(batches)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = dict(next(self.batches))
        B, T = batch["input_ids"].shape
        batch["position_ids"] = torch.arange(T, dtype=torch.long).expand(B, T).contiguous()
        return batch


def ulysses_adapter(batches, sp, device):
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPDataLoaderAdapter

    return UlyssesSPDataLoaderAdapter(WithPositionIds(batches), sp_rank=sp.rank, sp_group=sp.group,
                                      sp_world_size=sp.size, device=device)


class SequenceParallelLoader:
    """Infinite iterator of this rank's shards: `input_ids`, `position_ids`, `shift_labels`,
    `attention_mask`, each [B, T/sp] (see UlyssesSPDataLoaderAdapter)."""

    def __init__(self, loader, sp, device):
        self.loader = loader
        self.adapter = ulysses_adapter(loader, sp, device)
        self._before_refill = loader.state_dict()
        self._consumed = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if not self.adapter.micro_batches:
            self._before_refill = self.loader.state_dict()
            self._consumed = 0
        batch = next(self.adapter)
        self._consumed += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"loader": self._before_refill, "consumed_of_refill": self._consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state["loader"])
        self.adapter.micro_batches.clear()
        self._before_refill, self._consumed = state["loader"], 0
        for _ in range(int(state["consumed_of_refill"])):
            next(self)

    def stats(self) -> dict[str, Any]:
        return self.loader.stats()


def shard_eval_batches(batches: list[dict], sp, device, micro_batch_size: int) -> list[dict]:
    """This rank's shards of the SP group's held-out batches. Every rank must feed the adapter the same
    number of full batches (it gathers one from each per refill), and every rank the same number of
    evaluation steps (the metrics are reduced over all ranks), so the count is the minimum over all ranks."""
    full = [b for b in batches if b["input_ids"].shape[0] == micro_batch_size]
    n = _world_min(len(full), device)
    return list(ulysses_adapter(full[:n], sp, device)) if n else []


def _world_min(value: int, device) -> int:
    t = torch.tensor([value], dtype=torch.long, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return int(t.item())
