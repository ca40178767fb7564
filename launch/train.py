#!/usr/bin/env python
"""Train with a recipe: `deepspeed launch/train.py --recipe quickstart` (see README)."""
import sys

from rtpurbo_train.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
