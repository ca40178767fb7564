"""`python launch/calibrate.py [--model NAME_OR_PATH] [--output-dir DIR] [--set key=value ...]`:
the calibrate recipe alone (retrieval-head scores -> DIR/plan.json and a heatmap)."""
from __future__ import annotations

import argparse
import sys

from . import train


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="launch/calibrate.py", description=__doc__)
    p.add_argument("--model", default=None, help="model name or path (default: the recipe's)")
    args, rest = p.parse_known_args(argv)
    forwarded = ["--recipe", "calibrate", *rest]
    if args.model:
        forwarded += ["--set", f"model.name_or_path={args.model}"]
    return train.main(forwarded)


if __name__ == "__main__":
    sys.exit(main())
