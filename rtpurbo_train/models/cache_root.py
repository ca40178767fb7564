"""Where the package keeps converted models and tokenised data: `$RTPURBO_CACHE`, else
`~/.cache/rtpurbo_train/`."""
from __future__ import annotations

import os
from pathlib import Path


def rtpurbo_cache_root() -> Path:
    """The cache root (not created here)."""
    env = os.environ.get("RTPURBO_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rtpurbo_train"
