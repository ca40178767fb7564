#!/usr/bin/env python
"""See rtpurbo_train/cli/calibrate.py (`python launch/calibrate.py --help`)."""
import sys

from rtpurbo_train.cli.calibrate import main

if __name__ == "__main__":
    sys.exit(main())
