#!/usr/bin/env python
"""See rtpurbo_train/cli/export.py (`python launch/export.py --help`)."""
import sys

from rtpurbo_train.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
