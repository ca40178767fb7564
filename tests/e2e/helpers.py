"""Launch the real command lines the README documents, in a subprocess."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "fixtures" / "tiny_e2e.yaml"


def env(**extra):
    e = dict(os.environ)
    e.pop("TRITON_INTERPRET", None)
    e.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", **extra})
    return e


def free_port() -> int:
    """A TCP port nothing listens on now (each launch gets its own rendezvous port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_cmd(num_procs, *args, script=REPO / "launch" / "train.py"):
    return ["deepspeed", "--num_gpus", str(num_procs), "--master_port", str(free_port()), str(script), *args]


def python_cmd(*args):
    return [sys.executable, str(REPO / "launch" / "train.py"), *args]


def run(cmd, timeout=600, check=True, **kw):
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def losses_by_step(out_dir: Path, stage: str) -> dict[int, float]:
    """train/loss per step of one stage (a resumed run may log a step twice: keep the last)."""
    return {m["step"]: m["train/loss"] for m in metrics(out_dir) if m["stage"] == stage and "train/loss" in m}
