"""The run's output directory: default `runs/<recipe>-<timestamp>`; an existing one is resumed only
when it holds the same resolved recipe, and is never overwritten silently."""
from __future__ import annotations

import time
from pathlib import Path

from .. import distributed as dist
from ..config import dump_recipe
from ..errors import UserError


def resolve_output_dir(recipe, requested: str | None) -> tuple[Path, bool]:
    """-> (path, resuming). Rank 0 decides (one timestamp for all ranks); every rank gets the answer."""
    decision = None
    if dist.is_main():
        decision = _decide(recipe, requested)
    decision = dist.broadcast_object(decision)
    if isinstance(decision, str):
        raise UserError(decision)
    path, resuming = decision
    return Path(path), resuming


def _decide(recipe, requested):
    if requested is None:
        path = Path("runs") / f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        return str(path), False
    path = Path(requested)
    if path.exists() and not path.is_dir():
        return f"--output-dir {path} exists and is not a directory"
    if not path.exists() or not any(path.iterdir()):
        return str(path), False
    saved = path / "recipe.yaml"
    if not saved.is_file():
        return (f"--output-dir {path} is not empty and holds no recipe.yaml: refusing to write into it "
                f"(choose a new directory)")
    if saved.read_text() != dump_recipe(recipe):
        return (f"--output-dir {path} holds a run of a different recipe (see {saved}); "
                f"re-run with the same recipe and --set values to resume, or choose a new directory")
    return str(path), True
