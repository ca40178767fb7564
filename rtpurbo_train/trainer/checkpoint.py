"""Checkpoints for resume.

Layout under `DIR/checkpoints/<stage>/`:
- `step_<N>/`: a DeepSpeed checkpoint (model, optimizer, lr schedule), our client state (step) and
  one `rank_state_<r>.json` per rank (its data position: each data-parallel rank reads its own shard). Written as `tmp-step_<N>/` and renamed once every rank has finished, then the
  `latest` pointer is replaced atomically, so a save killed mid-write is never picked up.
- `final/model.safetensors`: the consolidated weights at the end of the stage (the next stage, or a
  resumed run, starts from them), also written to a temp folder and renamed.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .. import distributed as dist
from ..errors import UserError

KEEP_LAST = 2


def _replace_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def latest_step(stage_dir: Path) -> int | None:
    """Step of the newest complete checkpoint, or None. Falls back to scanning if `latest` is stale."""
    pointer = stage_dir / "latest"
    if pointer.is_file():
        tag = pointer.read_text().strip()
        if (stage_dir / tag).is_dir():
            return int(tag.split("_")[1])
    steps = sorted(int(p.name.split("_")[1]) for p in stage_dir.glob("step_*") if p.is_dir())
    return steps[-1] if steps else None


def save(engine, stage_dir: Path, step: int, client_state: dict, rank_state: dict) -> None:
    """All ranks call this. Raises UserError (after cleaning up) if the save fails; the previous
    checkpoint stays intact because `latest` moves only after a complete save."""
    tag, tmp_tag = f"step_{step}", f"tmp-step_{step}"
    if dist.is_main():
        stage_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(stage_dir / tmp_tag, ignore_errors=True)
    dist.barrier()
    error = None
    try:
        engine.save_checkpoint(str(stage_dir), tag=tmp_tag, client_state=client_state, save_latest=False)
        _replace_text(stage_dir / tmp_tag / f"rank_state_{dist.rank()}.json", json.dumps(rank_state))
    except (OSError, RuntimeError) as err:
        error = err
    failed = dist.any_rank(error is not None, engine.device)
    if dist.is_main():
        if failed:
            shutil.rmtree(stage_dir / tmp_tag, ignore_errors=True)
        else:
            shutil.rmtree(stage_dir / tag, ignore_errors=True)
            os.replace(stage_dir / tmp_tag, stage_dir / tag)
            _replace_text(stage_dir / "latest", tag)
            for old in sorted((p for p in stage_dir.glob("step_*") if p.is_dir()),
                              key=lambda p: int(p.name.split("_")[1]))[:-KEEP_LAST]:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    if failed:
        raise UserError(f"saving checkpoint {stage_dir / tag} failed ({error or 'on another rank'}); "
                        f"the previous checkpoint is intact")


def load(engine, stage_dir: Path, step: int) -> tuple[dict, dict]:
    """-> (client state, this rank's own state)."""
    _, client_state = engine.load_checkpoint(str(stage_dir), tag=f"step_{step}", load_module_strict=True,
                                             load_optimizer_states=True, load_lr_scheduler_states=True)
    own = stage_dir / f"step_{step}" / f"rank_state_{dist.rank()}.json"
    if client_state is None or not own.is_file():
        raise UserError(f"checkpoint {stage_dir}/step_{step} could not be loaded for rank {dist.rank()} "
                        f"(was it written with another number of processes?)")
    return client_state, json.loads(own.read_text())


def _full_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """Rank 0 gets the whole module state (ZeRO-3 gathers the shards); other ranks get None."""
    if engine.zero_optimization_stage() == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict() if dist.is_main() else None
    if not dist.is_main() or state is None:
        return None
    # clone: tied weights (shared storage) cannot be saved as separate safetensors entries otherwise
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in state.items()}


def save_final(engine, stage_dir: Path) -> None:
    state = _full_state_dict(engine)
    save_module_state(state, stage_dir)


def save_module_state(state: dict | None, stage_dir: Path) -> None:
    if dist.is_main() and state is not None:
        tmp = stage_dir / "final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(state, str(tmp / "model.safetensors"))
        shutil.rmtree(stage_dir / "final", ignore_errors=True)
        os.replace(tmp, stage_dir / "final")
    dist.barrier()


def final_weights(stage_dir: Path) -> Path | None:
    path = stage_dir / "final" / "model.safetensors"
    return path if path.is_file() else None


def load_final(model, path: Path) -> None:
    load_module_state(model, load_file(str(path)), path)


def load_module_state(model, state: dict, source) -> None:
    """Load a whole-module state dict; a UserError naming `source` if it does not fit the model."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    # tied weights may be saved once under either name
    missing = [m for m in missing if not m.endswith("lm_head.weight")]
    if missing or unexpected:
        raise UserError(f"{source} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
