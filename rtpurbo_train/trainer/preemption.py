"""SIGTERM/SIGUSR1 (cluster preemption): remember the request; the loop saves at the next step
boundary and the process exits 0, so re-running the same command resumes."""
import signal

_requested = {"signal": None}


def install() -> None:
    def handler(signum, frame):
        _requested["signal"] = signal.Signals(signum).name

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, handler)


def requested() -> str | None:
    return _requested["signal"]


class Preempted(Exception):
    """Raised after the checkpoint of a preempted run is safely on disk."""
