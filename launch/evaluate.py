#!/usr/bin/env python
"""See rtpurbo_train/cli/evaluate.py (`python launch/evaluate.py --help`)."""
import sys

from rtpurbo_train.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
