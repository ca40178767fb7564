"""Where metrics go: TensorBoard scalars, `metrics.jsonl` (one flat JSON object per logged step) and a
progress bar with ETA. Rank 0 only; the other ranks get a logger that does nothing."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .. import distributed as dist


class Monitor:
    def __init__(self, out_dir: Path, *, tensorboard: bool = True, progress: bool = True):
        self.active = dist.is_main()
        self.out_dir = out_dir
        self.tensorboard = tensorboard
        self.show_progress = progress
        self._writer = None
        self._bar = None
        self.summary: dict[str, dict[str, float]] = {}

    def _tb(self, purge_step: int | None = None):
        if self._writer is None and self.active and self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=purge_step)
        return self._writer

    def info(self, message: str) -> None:
        if self.active:
            print(f"[rtpurbo] {message}", flush=True)

    def start_stage(self, name: str, total_steps: int, first_step: int, global_offset: int) -> None:
        if not self.active:
            return
        self._tb(purge_step=global_offset + first_step if first_step else None)
        if self.show_progress:
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, initial=first_step, desc=name, dynamic_ncols=True, file=sys.stdout,
                             mininterval=1.0)

    def log(self, stage: str, step: int, global_step: int, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        record = {"stage": stage, "step": step, "global_step": global_step, "time": time.time(), **metrics}
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        writer = self._tb()
        if writer is not None:
            for key, value in metrics.items():
                writer.add_scalar(key, value, global_step)
        self.summary.setdefault(stage, {}).update(metrics)
        if self._bar is not None:
            shown = {k.split("/")[-1]: v for k, v in metrics.items() if k in ("train/loss", "train/lr")}
            self._bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def end_stage(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._writer is not None:
            self._writer.flush()

    def add_figure(self, tag: str, figure, step: int = 0) -> None:
        writer = self._tb()
        if writer is not None:
            writer.add_figure(tag, figure, step)

    def close(self) -> None:
        self.end_stage()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def summary_table(self) -> str:
        """The last logged value of the main metrics, one row per stage (rank 0 prints it at the end)."""
        keys = ("train/loss", "train/loss_distill", "train/loss_lm", "train/loss_indexer_kl", "train/loss_ssa_align",
                "eval/loss", "sparsity/mean", "recall/mean", "train/tokens_per_s")
        rows = {stage: m for stage, m in self.summary.items() if any(k in m for k in keys)}
        width = max([len(s) for s in rows] + [5])
        lines = [f"{'stage':{width}s}  " + "  ".join(f"{k:>21s}" for k in keys)]
        for stage, metrics in rows.items():
            cells = [f"{metrics[k]:21.4g}" if k in metrics else f"{'-':>21s}" for k in keys]
            lines.append(f"{stage:{width}s}  " + "  ".join(cells))
        return "\n".join(lines)
