"""Wall time of one whole-sequence forward (a prefill without KV cache), median over runs.

On CUDA the time is taken with CUDA events around the forward (device time, no host jitter from
queueing), after one warm-up run (allocator, kernel compilation); on CPU with `time.perf_counter` and
no warm-up (eager CPU kernels compile nothing on a first call, and the evaluation times lengths its needle
prompts have just run).
"""
from __future__ import annotations

import platform
import statistics
import time
from typing import Callable

import torch


def device_label(device: torch.device) -> str:
    """'cuda: NVIDIA H200' / 'cpu: x86_64, 2 threads': what the times were measured on."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"{device.type}: {platform.machine() or 'unknown'}, {torch.get_num_threads()} threads"


def default_warmup(device: torch.device) -> int:
    """Untimed calls before the timed ones: 1 on CUDA, 0 on CPU (module docstring)."""
    return 1 if device.type == "cuda" else 0


def time_forward(run: Callable[[], object], device: torch.device, runs: int, warmup: int | None = None) -> list[float]:
    """Seconds of each of `runs` calls of `run` (after `warmup` untimed calls; None: `default_warmup`)."""
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    for _ in range(default_warmup(device) if warmup is None else warmup):
        run()
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            with torch.cuda.device(device):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                run()
                end.record()
                end.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
    return times


def median_seconds(times: list[float]) -> float:
    return float(statistics.median(times))
