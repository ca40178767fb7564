"""The train / eval split: a record is held out by a hash of (source path, record index).

Stable: it does not depend on the shuffle seed, on other sources, or on which other records were
skipped, so the same documents stay held out across runs and cache rebuilds."""
from __future__ import annotations

import hashlib


def is_held_out(source_name: str, record_index: int, fraction: float) -> bool:
    if fraction <= 0.0:
        return False
    digest = hashlib.blake2b(f"{source_name}\0{record_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64 < fraction
