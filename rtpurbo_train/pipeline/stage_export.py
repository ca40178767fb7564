"""Export stage: DIR/export/, the Hugging Face folder inference engines load."""
from __future__ import annotations

from .. import distributed as dist
from ..export import export_model


def run_export(ctx, stage, name: str) -> None:
    if dist.is_main():
        path = export_model(ctx.model, ctx.tokenizer, ctx.plan, ctx.out_dir / "export", dtype=stage.dtype,
                            max_shard_size=stage.max_shard_size)
        ctx.monitor.info(f"exported to {path}")
    dist.barrier()
