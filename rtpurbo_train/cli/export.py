"""`python launch/export.py --run DIR [--checkpoint DIR/checkpoints/<stage>/step_N] [--out PATH]`:
write the Hugging Face export folder of a training run."""
from __future__ import annotations

import argparse
import sys


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch/export.py", description=__doc__)
    p.add_argument("--run", required=True, help="the output dir of a training run")
    p.add_argument("--checkpoint", default=None, help="export this DeepSpeed checkpoint folder instead of the "
                                                      "last completed stage's weights")
    p.add_argument("--out", default=None, help="export folder (default RUN/export)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--max-shard-size", default="2GB")
    p.add_argument("--debug", action="store_true")
    return p


def _main(args) -> None:
    from pathlib import Path

    from ..export import export_model
    from ..pipeline.load_run import load_run

    ctx = load_run(args.run, checkpoint=args.checkpoint)
    out = Path(args.out) if args.out else Path(args.run) / "export"
    path = export_model(ctx.model, ctx.tokenizer, ctx.plan, out, dtype=args.dtype, max_shard_size=args.max_shard_size)
    print(f"exported to {path}")


def main(argv=None) -> int:
    from .common import run_main

    args = parser().parse_args(argv)
    return run_main(lambda _: _main(args), argv, args.debug)


if __name__ == "__main__":
    sys.exit(main())
