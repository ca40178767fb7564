"""`DIR/state.json`: which stages are complete (so a re-run skips them)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .. import distributed as dist


def completed_stages(out_dir: Path) -> list[str]:
    path = out_dir / "state.json"
    return json.loads(path.read_text())["completed"] if path.is_file() else []


def mark_completed(out_dir: Path, name: str) -> None:
    if dist.is_main():
        done = completed_stages(out_dir)
        if name not in done:
            done.append(name)
        tmp = out_dir / "state.json.tmp"
        tmp.write_text(json.dumps({"completed": done}, indent=1))
        os.replace(tmp, out_dir / "state.json")
    dist.barrier()
