"""`deepspeed launch/train.py --recipe NAME [--output-dir DIR] [--set key=value ...]` (or plain python)."""
from __future__ import annotations

import argparse
import sys


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch/train.py", description=__doc__)
    p.add_argument("--recipe", required=True, help="a recipe name from recipes/ or a path to a YAML file")
    p.add_argument("--output-dir", default=None, help="run directory (default runs/<recipe>-<timestamp>); "
                                                      "re-run with the same one to resume")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set stages.sparse_train.steps=10 (repeatable)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved recipe, world size, SP/DP split and a memory estimate; load no weights")
    p.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p


def _main(args) -> None:
    from ..config import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.dry_run:
        from .dry_run import dry_run
        dry_run(recipe)
        return
    from ..pipeline import run_recipe
    from ..trainer.preemption import Preempted

    try:
        run_recipe(recipe, args.output_dir)
    except Preempted as stop:
        print(f"[rtpurbo] preempted: {stop}; re-run the same command to resume", flush=True)


def main(argv=None) -> int:
    from .common import run_main

    args = parser().parse_args(argv)
    return run_main(lambda _: _main(args), argv, args.debug)


if __name__ == "__main__":
    sys.exit(main())
