"""Where the package keeps converted models and tokenised data (`$RTPURBO_CACHE`, else
`~/.cache/rtpurbo_train/`), and the lock that lets concurrent ranks build a cache entry once."""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path


def rtpurbo_cache_root() -> Path:
    """The cache root (not created here)."""
    env = os.environ.get("RTPURBO_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rtpurbo_train"


@contextmanager
def exclusive_lock(path: Path):
    """An OS file lock: the first process builds, the others wait and then find the result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
