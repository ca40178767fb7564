"""Stand-ins for scontrol, srun, deepspeed, pkill, torchrun and launch/train.py, to run the rendered job
scripts on one machine: they record what they were asked to do, and the fake trainer waits for the
stop signal like the real one (checkpoint, exit 0)."""
import json
import os
import stat
import sys
import time
from pathlib import Path

FAKE_TRAINER = '''
import json, os, signal, sys, time
out = sys.argv[sys.argv.index("--output-dir") + 1]
stopped = []
signal.signal(signal.SIGUSR1, lambda *_: stopped.append("USR1"))
keys = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"]
record = {"argv": sys.argv[1:], "env": {k: os.environ.get(k) for k in keys}, "pid": os.getpid()}
os.makedirs(out, exist_ok=True)
path = os.path.join(out, f"trainer-{os.getpid()}.json")
with open(path + ".tmp", "w") as f:
    json.dump(record, f)
os.replace(path + ".tmp", path)  # readers never see a half-written record
if os.environ.get("FAKE_TRAINER_MODE") == "finish":
    sys.exit(0)
deadline = time.time() + 60
while not stopped and time.time() < deadline:
    time.sleep(0.02)
with open(os.path.join(out, f"saved-{os.getpid()}"), "w") as f:
    f.write(",".join(stopped))
sys.exit(0 if stopped else 7)
'''

SCONTROL = '''#!/bin/bash
case "$1 $2" in
  "show hostnames") printf 'nodeA\\nnodeB\\n' ;;
  requeue*) echo "$2" >> "$FAKE_LOG/requeue" ;;
  *) echo "fake scontrol: unexpected $*" >&2; exit 1 ;;
esac
'''

# srun: a launch step (--ntasks-per-node=M, --nodes=N) starts N*M local tasks with Slurm's task ids and
# forwards USR1/TERM to them like srun does; any other use runs the command once
SRUN = '''#!PYTHON
import os, signal, subprocess, sys
args = sys.argv[1:]
with open(os.path.join(os.environ["FAKE_LOG"], "srun.calls"), "a") as f:
    f.write(" ".join(args) + "\\n")
opts = {}
while args and args[0].startswith("-"):
    key, _, value = args.pop(0).partition("=")
    opts[key] = value
if args[0] == "pkill":
    sys.exit(subprocess.call(args))
nodes, per_node = int(opts["--nodes"]), int(opts["--ntasks-per-node"])
tasks = []
for rank in range(nodes * per_node):
    env = dict(os.environ, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank % per_node),
               SLURM_NTASKS=str(nodes * per_node), SLURM_NODEID=str(rank // per_node))
    tasks.append(subprocess.Popen(args, env=env))
for sig in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(sig, lambda s, _f: [t.send_signal(s) for t in tasks])
codes = [t.wait() for t in tasks]
sys.exit(next((c if c > 0 else 128 - c for c in codes if c), 0))  # killed by signal s: 128 + s
'''

DEEPSPEED = '''#!/bin/bash
printf '%s\\n' "$@" > "$FAKE_LOG/deepspeed.args"
while [ $# -gt 0 ] && [ "$1" != launch/train.py ]; do shift; done
shift
# one trainer, started the way DeepSpeed's per-node launcher starts each of them
exec PYTHON -u launch/train.py --local_rank=0 "$@"
'''

# pkill: checks the pattern against the real command lines of the fake trainers, signals matches by id
PKILL = '''#!/bin/bash
printf '%s\\n' "$@" > "$FAKE_LOG/pkill.args"
pattern="${@: -1}"
for record in "$OUTPUT_ROOT"/*/trainer-*.json; do
    pid=$(basename "$record" .json); pid=${pid#trainer-}
    cmdline=$(tr '\\0' ' ' < "/proc/$pid/cmdline"); cmdline=${cmdline% }
    if printf '%s' "$cmdline" | grep -Eq -- "$pattern"; then kill -USR1 "$pid"; fi
done
'''

# torchrun: starts --nproc-per-node local trainers with torch's env vars; no USR1 handler, so a SIGUSR1
# meant for the trainers would kill it (as it kills the real torchrun)
TORCHRUN = '''#!PYTHON
import argparse, os, subprocess, sys
p = argparse.ArgumentParser()
for name in ("--nnodes", "--nproc-per-node", "--node-rank", "--master-port"):
    p.add_argument(name, type=int)
p.add_argument("--master-addr")
p.add_argument("script")
p.add_argument("rest", nargs=argparse.REMAINDER)
a = p.parse_args()
with open(os.path.join(os.environ["FAKE_LOG"], "torchrun.args"), "w") as f:
    f.write(" ".join(sys.argv[1:]))
workers = []
for local in range(a.nproc_per_node):
    env = dict(os.environ, RANK=str(a.node_rank * a.nproc_per_node + local), LOCAL_RANK=str(local),
               WORLD_SIZE=str(a.nnodes * a.nproc_per_node), LOCAL_WORLD_SIZE=str(a.nproc_per_node),
               MASTER_ADDR=a.master_addr, MASTER_PORT=str(a.master_port))
    workers.append(subprocess.Popen([sys.executable, a.script, *a.rest], env=env))
codes = [w.wait() for w in workers]
sys.exit(next((c if c > 0 else 128 - c for c in codes if c), 0))
'''


def make_fake_cluster(root: Path, fake_pkill: bool = True) -> dict:
    """Create `root/bin` (fake commands), `root/repo/launch/train.py` (fake trainer), `root/log`.

    `fake_pkill=False` keeps the system pkill (the Kubernetes entry point signals by parent pid)."""
    bin_dir, repo, log = root / "bin", root / "repo", root / "log"
    for d in (bin_dir, repo / "launch", log):
        d.mkdir(parents=True, exist_ok=True)
    (repo / "launch" / "train.py").write_text(FAKE_TRAINER)
    for name, body in (("scontrol", SCONTROL), ("srun", SRUN), ("deepspeed", DEEPSPEED), ("pkill", PKILL),
                       ("torchrun", TORCHRUN)):
        if name == "pkill" and not fake_pkill:
            continue
        path = bin_dir / name
        path.write_text(body.replace("PYTHON", sys.executable))
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_LOG=str(log),
               OUTPUT_ROOT=str(repo / "runs"), USER=os.environ.get("USER", "tester"))
    return {"bin": bin_dir, "repo": repo, "log": log, "env": env}


def wait_for_trainers(out_dir: Path, count: int, proc, timeout: float = 60.0) -> list[dict]:
    """The records of `count` fake trainers once all have started (fails if the job exits first).

    A trainer writes its record after installing its SIGUSR1 handler, so it can be signalled then."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        records = sorted(out_dir.glob("trainer-*.json")) if out_dir.is_dir() else []
        if len(records) >= count:
            return [json.loads(r.read_text()) for r in records]
        if proc.poll() is not None:
            raise AssertionError(f"job exited early: {proc.communicate()}")
        time.sleep(0.05)
    raise AssertionError("trainers did not start")
