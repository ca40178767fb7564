"""Shared CLI plumbing: user errors print one line and exit 2; --debug shows the traceback."""
from __future__ import annotations

import os
import sys

from ..errors import UserError


def run_main(fn, argv, debug: bool) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        fn(argv)
        return 0
    except UserError as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
