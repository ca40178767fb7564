"""Process-group helpers: NCCL on GPUs, gloo on CPU; everything degrades to one process."""
from __future__ import annotations

import atexit
import os
from typing import Sequence

import torch
import torch.distributed as dist


def init(timeout_minutes: int = 30) -> torch.device:
    """Join the process group the launcher (deepspeed, torchrun, srun) described; return this rank's device."""
    import datetime

    import deepspeed

    cuda = torch.cuda.is_available()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False,
                                   timeout=datetime.timedelta(minutes=timeout_minutes))
    if not is_main():
        _quiet()
    if cuda:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        return device
    _remove_shm_buffer_at_exit()
    if "OMP_NUM_THREADS" not in os.environ:
        # CPU ranks of one host share its cores; more threads than cores makes every rank slower
        local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or os.environ.get("WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local, 1)))
    return torch.device("cpu")


def _remove_shm_buffer_at_exit() -> None:
    """DeepSpeed's CPU all-reduce (deepspeed/ops/csrc/cpu/comm/shm.cpp) creates a 69 MB /dev/shm segment
    per rank and never removes it: a few dozen CPU runs fill /dev/shm and the next one is OOM-killed.
    Remove this rank's at exit (the other ranks' mappings stay valid)."""
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_"
            f"{os.environ['MASTER_PORT']}_{rank()}")

    def remove():
        if os.path.exists(name):
            os.remove(name)

    atexit.register(remove)


def _quiet() -> None:
    """Only rank 0 talks: silence library warnings and info logs on the other ranks."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("transformers", "DeepSpeed", "deepspeed", "datasets", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's value on every rank."""
    if not dist.is_initialized() or world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def forward_share(model) -> tuple[int, int]:
    """(this rank, ranks) to deal independent no-grad forwards over (calibration documents, evaluation
    prompts). Every rank holds the whole model, unless DeepSpeed's ZeRO-3 has partitioned it (it marks
    those parameters with `ds_id`): its forwards need every rank, so each runs them all: (0, 1)."""
    if world_size() == 1 or any(hasattr(p, "ds_id") for p in model.parameters()):
        return 0, 1
    return rank(), world_size()


def deal(items: Sequence, share: tuple[int, int]) -> Sequence:
    """This rank's items under `forward_share`: every world-th one, from its rank on."""
    mine, ranks = share
    return items[mine::ranks]


def all_gather_objects(obj) -> list:
    """[rank 0's obj, rank 1's obj, ...] on every rank (picklable objects); [obj] in one process."""
    if not dist.is_initialized() or world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(values: list[float], device) -> list[float]:
    if not dist.is_initialized() or world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool, device) -> bool:
    """True on every rank if it is True on any rank (e.g. a preemption signal seen by one process)."""
    return all_reduce_sum([1.0 if flag else 0.0], device)[0] > 0
