"""What every benchmark result file (benchmarks/results/*.md) starts with, and how it is written."""
from __future__ import annotations

import datetime
import sys
from pathlib import Path

import torch


def provenance(script: str, argv=None) -> list[str]:
    """The `- date/device/torch` and `- command` lines: when, where and how the numbers were made."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    args = " ".join(sys.argv[1:] if argv is None else argv)
    return [f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; device: {device}; "
            f"torch {torch.__version__}",
            f"- command: `python benchmarks/{script} {args}`"]


def emit(lines: list[str], out: str | None) -> None:
    """Print the result and write it to `out` (if given)."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        Path(out).write_text(text)
