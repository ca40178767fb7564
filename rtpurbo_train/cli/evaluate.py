"""`python launch/evaluate.py --run DIR [--lengths 1024 2048] [--depths 0.1 0.5 0.9]`: dense vs sparse
evaluation of a training run -> DIR/report.md, DIR/metrics.json, DIR/plots/."""
from __future__ import annotations

import argparse
import sys


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch/evaluate.py", description=__doc__)
    p.add_argument("--run", required=True, help="the output dir of a training run")
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="context lengths (tokens)")
    p.add_argument("--depths", type=float, nargs="+", default=None, help="needle depths in [0, 1]")
    p.add_argument("--samples-per-cell", type=int, default=None)
    p.add_argument("--tasks", nargs="+", default=None,
                   help="needle tasks (passkey single_needle multikey multivalue vartrack)")
    p.add_argument("--haystack", default=None, choices=["auto", "heldout", "generated"],
                   help="needle haystack: held-out documents of data.sources, or the generated filler")
    p.add_argument("--backend", default=None, choices=["auto", "reference", "triton"])
    p.add_argument("--debug", action="store_true")
    return p


def _main(args) -> None:
    import torch

    from ..config.stages import EvaluateStage
    from ..pipeline.load_run import load_run
    from ..pipeline.stage_evaluate import run_evaluate

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    ctx = load_run(args.run, device=device)
    if args.backend:
        ctx.runtime.backend = args.backend
    defaults = next((s for s in ctx.recipe.stages if s.type == "evaluate"), EvaluateStage())
    stage = defaults.model_copy(update={k: v for k, v in {"lengths": args.lengths, "depths": args.depths,
                                                          "samples_per_cell": args.samples_per_cell,
                                                          "tasks": args.tasks, "haystack": args.haystack}.items()
                                        if v is not None})
    try:
        stage = EvaluateStage.model_validate(stage.model_dump())
    except ValueError as err:  # pydantic's ValidationError, e.g. an unknown task
        from ..errors import UserError
        raise UserError(f"invalid evaluation settings: {str(err).splitlines()[-1].strip()}") from None
    run_evaluate(ctx, stage, "evaluate")


def main(argv=None) -> int:
    from .common import run_main

    args = parser().parse_args(argv)
    return run_main(lambda _: _main(args), argv, args.debug)


if __name__ == "__main__":
    sys.exit(main())
