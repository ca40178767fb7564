#!/usr/bin/env python
"""Run the SmolLM2-135M RTPurbo benchmark: the full rtpurbo_300step recipe and short ablations,
one queue of runs per GPU, each run through the deepspeed launcher.

    python benchmarks/smollm2_rtpurbo/run.py --out-root DIR [--gpus 0 1] [--only NAME ...]
        [--base-recipe rtpurbo_300step] [--extra-set KEY=VALUE ...] [--dry-run]

Detached: `setsid nohup python benchmarks/smollm2_rtpurbo/run.py --out-root DIR > DIR.driver.log 2>&1 &`.
Per run: DIR/<name>/ (the pipeline's run directory), DIR/<name>.log, DIR/<name>.time.json.
DIR/status.json follows the runs. A run whose directory has DONE is skipped; re-running the same
command resumes the others (the pipeline skips completed stages and resumes the current one from its
latest checkpoint when given the same --output-dir and the same resolved recipe). `kill <driver pid>`
(DIR/driver.pid) stops the runs: each saves at its next step boundary if it can, and a re-run resumes.
Exit code 0 only when every selected run has finished (DONE).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
BASE_PORT = 29610  # queue i rendezvous on BASE_PORT + i

# The short schedule shared by every ablation (the full run uses the recipe as is).
# Warm-up is cheap (backbone frozen): 100 steps x 4 sequences, so the ablations compare trained indexers.
SHORT_WARMUP = ["stages.indexer_warmup.steps=100", "stages.indexer_warmup.micro_batch_size=4", "stages.indexer_warmup.grad_accum=1",
                "stages.indexer_warmup.warmup_steps=10"]
SHORT_SPARSE = ["stages.sparse_train.steps=60", "stages.sparse_train.micro_batch_size=2", "stages.sparse_train.grad_accum=1",
                "stages.sparse_train.warmup_steps=5", "stages.sparse_train.eval_every=0"]
SHORT_EVAL = ["stages.evaluate.samples_per_cell=2", "stages.evaluate.depths=[0.1,0.5,0.9]",
              "stages.evaluate.perplexity_docs=4"]
SHORT_EVAL_NOTE = "eval 2 prompts/cell at depths 0.1/0.5/0.9, 4 perplexity docs"
SHORT_NOTE = f"short schedule: warm-up 100 steps x 4 sequences, sparse 60 x 2, {SHORT_EVAL_NOTE}"


@dataclass
class Run:
    name: str
    note: str
    sets: list[str]                 # --set values (the short schedule and the ablation's own)
    no_warmup: bool = False         # use the base recipe without its indexer_warmup stage
    queue: int = 0
    recipe: str = ""                # filled by plan_runs: a recipe name or YAML path
    argv: list[str] = field(default_factory=list)


def define_runs() -> list[Run]:
    short = SHORT_WARMUP + SHORT_SPARSE + SHORT_EVAL
    return [
        Run("full", "the base recipe as is", []),
        # Issue 16's sweep at the full schedule: window 512 reaches 75% block sparsity at 8K, 1024 cannot.
        Run("full_window_512", "the base recipe with window 512", ["sparsity.window=512"]),
        Run("full_window_512_retrieval_0.20", "the base recipe with window 512 and retrieval fraction 0.20",
            ["sparsity.window=512", "sparsity.retrieval_fraction=0.20"]),
        Run("short_top_p", f"baseline ablation: top-p 0.9, retrieval 0.15; {SHORT_NOTE}", short),
        Run("short_top_k", f"fixed top-16 blocks instead of top-p; {SHORT_NOTE}", short + ["sparsity.top_k=16"]),
        Run("short_ssa", f"SSA: mode both + ssa_align 10.0 (as recipes/ssa_align.yaml); {SHORT_NOTE}",
            short + ["stages.sparse_train.mode=both", "stages.sparse_train.losses.ssa_align=10.0"]),
        Run("short_no_warmup", "no indexer warm-up stage (the sparse stage starts from the random JL indexer); "
            f"short schedule: sparse 60 x 2, {SHORT_EVAL_NOTE}", SHORT_SPARSE + SHORT_EVAL, no_warmup=True),
        Run("short_retrieval_0.10", f"retrieval fraction 0.10; {SHORT_NOTE}", short + ["sparsity.retrieval_fraction=0.10"]),
        Run("short_retrieval_0.30", f"retrieval fraction 0.30; {SHORT_NOTE}", short + ["sparsity.retrieval_fraction=0.30"]),
        # Window 512 is the widest that can reach 75% block sparsity at 8K (streaming heads 85.0% vs 73.9% at 1024).
        Run("short_window_512", f"window 512 instead of 1024; {SHORT_NOTE}", short + ["sparsity.window=512"]),
        Run("short_ssa_window_512", f"window 512 and SSA (mode both, ssa_align 10.0); {SHORT_NOTE}",
            short + ["sparsity.window=512", "stages.sparse_train.mode=both", "stages.sparse_train.losses.ssa_align=10.0"]),
        # The cheap selection and KL of issue 14 against the baseline's exact forms (query_stride auto = 1 at 8K).
        Run("short_query_stride_8", f"block selection from every 8th query of a block (query_stride 8); {SHORT_NOTE}",
            short + ["sparsity.query_stride=8"]),
        Run("short_kl_stride_8", f"query_stride 8 and the warm-up indexer KL on every 8th query block; {SHORT_NOTE}",
            short + ["sparsity.query_stride=8", "stages.indexer_warmup.kl_query_block_stride=8"]),
    ]


def base_raw(base_recipe: str, no_warmup: bool = False) -> tuple[Path, dict]:
    """The base recipe's YAML as a dict (without its indexer_warmup stage if asked)."""
    from rtpurbo_train.config.loader import recipe_path

    path = recipe_path(base_recipe)
    raw = yaml.safe_load(path.read_text())
    if no_warmup:
        raw["stages"] = [s for s in raw["stages"] if s.get("type") != "indexer_warmup"]
    return path, raw


def no_warmup_recipe(base_recipe: str, out_root: Path, write: bool) -> Path:
    """The base recipe without its indexer_warmup stage, generated (so it follows the base recipe) into
    DIR/recipes/<base>_no_warmup.yaml; rewritten only when its content changes (resume needs the same recipe)."""
    path, raw = base_raw(base_recipe, no_warmup=True)
    source = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    text = (f"# Generated by benchmarks/smollm2_rtpurbo/run.py from {source} with the indexer_warmup stage removed.\n"
            + yaml.safe_dump(raw, sort_keys=False))
    target = out_root / "recipes" / f"{path.stem}_no_warmup.yaml"
    if write and (not target.is_file() or target.read_text() != text):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return target


def check_recipe(run: Run, base_recipe: str) -> None:
    """Resolve the run's recipe with its --set values now, so a typo fails before anything starts."""
    from rtpurbo_train.config.loader import apply_override, validate_recipe

    _, raw = base_raw(base_recipe, run.no_warmup)
    for assignment in run.sets:
        apply_override(raw, assignment)
    validate_recipe(raw, f"{run.name} ({base_recipe} + --set)")


def plan_runs(args) -> list[Run]:
    runs = define_runs()
    known = [r.name for r in runs]
    unknown = [n for n in args.only or [] if n not in known]
    if unknown:
        raise ValueError(f"unknown run(s) {unknown}; runs: {known}")
    runs = [r for r in runs if not args.only or r.name in args.only]
    queues = len(args.gpus)
    ablation_queues = list(range(1, queues)) or [0]
    for i, run in enumerate(r for r in runs if r.name != "full"):
        run.queue = ablation_queues[i % len(ablation_queues)]
    for run in runs:
        extra = args.extra_set
        if run.no_warmup:  # this run has no indexer_warmup stage to address
            extra = [s for s in extra if not s.startswith("stages.indexer_warmup.")]
        run.sets = run.sets + extra
        run.recipe = (str(no_warmup_recipe(args.base_recipe, args.out_root, write=not args.dry_run))
                      if run.no_warmup else args.base_recipe)
        check_recipe(run, args.base_recipe)
        # --include, not CUDA_VISIBLE_DEVICES: with --num_gpus the deepspeed launcher (0.19.8) drops
        # CUDA_VISIBLE_DEVICES and hands every run GPU 0.
        run.argv = ["deepspeed", "--include", f"localhost:{args.gpus[run.queue]}",
                    "--master_port", str(BASE_PORT + run.queue), "launch/train.py",
                    "--recipe", run.recipe, "--output-dir", str(args.out_root / run.name)]
        for assignment in run.sets:
            run.argv += ["--set", assignment]
    return runs


class Status:
    """DIR/status.json, rewritten atomically on every change (the queues run in threads)."""

    def __init__(self, out_root: Path, runs: list[Run], gpus: list[str]):
        self.path = out_root / "status.json"
        self.lock = threading.Lock()
        self.data = {"driver_pid": os.getpid(), "started": now(), "gpus": gpus, "finished": None,
                     "runs": {r.name: {"state": "pending", "queue": r.queue, "gpu": gpus[r.queue], "note": r.note,
                                       "command": shlex.join(r.argv), "log": f"{r.name}.log"} for r in runs}}
        self.write()

    def update(self, name: str | None = None, **fields) -> None:
        with self.lock:
            (self.data["runs"][name] if name else self.data).update(fields)
            self.write()

    def write(self) -> None:
        self.data["updated"] = now()
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")


class Driver:
    def __init__(self, out_root: Path, runs: list[Run], gpus: list[str]):
        self.out_root, self.runs = out_root, runs
        self.status = Status(out_root, runs, gpus)
        self.stopping = False
        self.children: dict[str, subprocess.Popen] = {}
        self.lock = threading.Lock()

    def run_one(self, run: Run) -> bool:
        out_dir = self.out_root / run.name
        if (out_dir / "DONE").exists():
            self.status.update(run.name, state="skipped (DONE)")
            return True
        timing_path = self.out_root / f"{run.name}.time.json"
        timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {"attempts": []}
        timing.update(name=run.name, note=run.note, command=shlex.join(run.argv), gpu=self.status.data["gpus"][run.queue])
        env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}  # the GPU is --include's
        env.setdefault("PYTHONUNBUFFERED", "1")
        with open(self.out_root / f"{run.name}.log", "a") as log:
            with self.lock:  # no new run once a stop was asked for
                if self.stopping:
                    self.status.update(run.name, state="not started")
                    return False
                log.write(f"\n===== {now()} driver: {shlex.join(run.argv)}\n")
                log.flush()
                start = time.time()
                child = subprocess.Popen(run.argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)  # own process group: stop() signals all of it
                self.children[run.name] = child
            self.status.update(run.name, state="running", start=now())
            rc = child.wait()
            with self.lock:
                self.children.pop(run.name, None)
        wall = time.time() - start
        done = (out_dir / "DONE").exists()
        timing["attempts"].append({"start": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start)),
                                   "wall_s": round(wall, 1), "rc": rc, "done": done})
        timing["wall_s_total"] = round(sum(a["wall_s"] for a in timing["attempts"]), 1)
        timing_path.write_text(json.dumps(timing, indent=1))
        state = "done" if rc == 0 and done else ("stopped" if rc == 0 or self.stopping else "failed")
        self.status.update(run.name, state=state, rc=rc, wall_s=round(wall, 1), end=now())
        return state == "done"

    def run_queue(self, queue: int, results: dict) -> None:
        for run in (r for r in self.runs if r.queue == queue):
            results[run.name] = self.run_one(run)

    def stop(self, signum, frame) -> None:
        """SIGTERM/SIGINT: start nothing new; SIGTERM the running launchers (the pipeline saves at its next
        step boundary within the launcher's 30 s grace and a re-run resumes)."""
        with self.lock:
            self.stopping = True
            for child in self.children.values():
                try:
                    os.killpg(child.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def main(self) -> int:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        results: dict[str, bool] = {}
        queues = sorted({r.queue for r in self.runs})
        threads = [threading.Thread(target=self.run_queue, args=(q, results)) for q in queues]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(timeout=1.0)  # a short join keeps the main thread responsive to signals
        failed = [n for n, ok in results.items() if not ok]
        self.status.update(finished=now(), failed=failed)
        print(f"[driver] finished; {len(results) - len(failed)}/{len(results)} runs done"
              + (f"; not done: {failed}" if failed else ""), flush=True)
        return 1 if failed else 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-root", type=Path, required=True, help="one directory per run goes here")
    p.add_argument("--gpus", nargs="+", default=None,
                   help="one queue per entry (a GPU index): full on the first, ablations on the others; an index "
                        "may repeat (queues sharing a GPU). Default: one queue per visible GPU, or three on one GPU")
    p.add_argument("--only", nargs="+", help="run only these (names: full, short_top_p, short_top_k, ...)")
    p.add_argument("--base-recipe", default="rtpurbo_300step", help="recipe name or YAML path")
    p.add_argument("--extra-set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="--set values appended to every run (e.g. for a smoke test)")
    p.add_argument("--dry-run", action="store_true", help="check the recipes and print the commands; run nothing")
    return p.parse_args(argv)


def default_gpus() -> list[str]:
    """One queue per visible GPU; on a single GPU three queues share it (a SmolLM2 step is launch-bound,
    so runs sharing a GPU overlap well: the committed result ran that way)."""
    import torch

    count = torch.cuda.device_count()
    return [str(i) for i in range(count)] if count > 1 else ["0", "0", "0"]


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out_root = args.out_root.resolve()
    args.gpus = args.gpus or default_gpus()
    try:
        runs = plan_runs(args)
    except Exception as err:  # a bad --set or recipe: one line, nothing started
        print(f"[driver] {err}", file=sys.stderr)
        return 2
    for run in runs:
        print(f"# {run.name} (queue {run.queue}, GPU {args.gpus[run.queue]}): {run.note}\n"
              f"{shlex.join(run.argv)} > {args.out_root / run.name}.log 2>&1\n", flush=True)
    if args.dry_run:
        return 0
    if shutil.which("deepspeed") is None:
        print("[driver] the deepspeed launcher is not on PATH (pip install deepspeed)", file=sys.stderr)
        return 2
    args.out_root.mkdir(parents=True, exist_ok=True)
    (args.out_root / "driver.pid").write_text(f"{os.getpid()}\n")
    write_environment(args.out_root)
    return Driver(args.out_root, runs, args.gpus).main()


def write_environment(out_root: Path) -> None:
    """DIR/environment.json: package versions, GPUs and the git commit, for the report."""
    from importlib.metadata import PackageNotFoundError, version

    def pkg(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    def cmd(*argv):
        try:
            return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            return None

    env = {"written": now(), "python": sys.version.split()[0],
           "packages": {n: pkg(n) for n in ("torch", "triton", "deepspeed", "transformers", "rtpurbo-train")},
           "gpus": cmd("nvidia-smi", "--query-gpu=index,name,driver_version,memory.total", "--format=csv,noheader"),
           "git_commit": cmd("git", "rev-parse", "--short", "HEAD")}
    if env["git_commit"]:
        env["git_dirty"] = bool(cmd("git", "status", "--porcelain", "--untracked-files=no"))
    (out_root / "environment.json").write_text(json.dumps(env, indent=1))


if __name__ == "__main__":
    sys.exit(main())
