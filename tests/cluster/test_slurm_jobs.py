"""Run the rendered Slurm scripts against fake scontrol/srun/deepspeed/pkill: hostfile, launch command,
torch-distributed variables, and the preemption path (signal -> trainers checkpoint -> requeue)."""
import os
import re
import signal
import subprocess

import pytest

from rtpurbo_train.cluster import render_template
from .fake_cluster import make_fake_cluster, wait_for_trainers

OUTPUT_DIR = "runs/t.1+x"  # regex metacharacters: the trainer pattern must escape them


def start_job(tmp_path, template, mode="wait"):
    fake = make_fake_cluster(tmp_path)
    values = {"partition": "gpu", "recipe": "quickstart", "output_dir": OUTPUT_DIR, "nodes": 2,
              "gpus_per_node": 2, "master_port": 29511, "repo_dir": str(fake["repo"]),
              "extra_args": "--set stages.0.steps=3"}
    script = tmp_path / "job.sh"
    script.write_text(render_template(template, values))
    env = dict(fake["env"], SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node[A-B]", SLURM_JOB_NUM_NODES="2",
               SLURM_SUBMIT_DIR=str(tmp_path), FAKE_TRAINER_MODE=mode)
    proc = subprocess.Popen(["bash", str(script)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    return fake, proc


def finish(proc):
    out, _ = proc.communicate(timeout=60)
    return proc.returncode, out


@pytest.mark.timeout(120)
def test_sbatch_time_limit_warning_checkpoints_and_requeues(tmp_path):
    fake, proc = start_job(tmp_path, "slurm_sbatch")
    out_dir = fake["repo"] / OUTPUT_DIR
    (trainer,) = wait_for_trainers(out_dir, 1, proc)
    proc.send_signal(signal.SIGUSR1)  # what `--signal=B:USR1@120` delivers to the batch shell
    rc, log = finish(proc)
    assert rc == 0, log
    assert (out_dir / f"saved-{trainer['pid']}").read_text() == "USR1"
    assert (fake["log"] / "requeue").read_text().split() == ["4242"]
    assert (out_dir / "hostfile.4242").read_text() == "nodeA slots=2\nnodeB slots=2\n"
    args = (fake["log"] / "deepspeed.args").read_text().split("\n")[:-1]
    assert args == ["--hostfile", f"{OUTPUT_DIR}/hostfile.4242", "--master_addr", "nodeA", "--master_port",
                    "29511", "launch/train.py", "--recipe", "quickstart", "--output-dir", OUTPUT_DIR,
                    "--set", "stages.0.steps=3"]
    assert trainer["argv"] == ["--local_rank=0", *args[7:]]
    assert "--overlap" in (fake["log"] / "srun.calls").read_text()


def test_sbatch_trainer_pattern_skips_launcher_processes(tmp_path):
    fake, proc = start_job(tmp_path, "slurm_sbatch")
    wait_for_trainers(fake["repo"] / OUTPUT_DIR, 1, proc)
    proc.send_signal(signal.SIGTERM)
    rc, log = finish(proc)
    assert rc == 0, log
    assert not (fake["log"] / "requeue").exists()  # SIGTERM: preemption requeues by itself, scancel must not
    pattern = (fake["log"] / "pkill.args").read_text().split("\n")[-2]
    rest = f"--recipe quickstart --output-dir {OUTPUT_DIR} --set stages.0.steps=3"
    must_not_match = [  # processes of the same run that SIGUSR1 would kill
        f"/venv/bin/python /venv/bin/deepspeed --hostfile h --master_addr nodeA launch/train.py {rest}",
        f"pdsh -S -f 1024 -w nodeA,nodeB export PYTHONPATH=/r; cd /r; /venv/bin/python -u -m "
        f"deepspeed.launcher.launch --world_info=e30= --node_rank=%n launch/train.py {rest}",
        f"/venv/bin/python -u -m deepspeed.launcher.launch --node_rank=1 launch/train.py {rest}",
        f"/venv/bin/python -u launch/train.py --local_rank=0 --recipe quickstart --output-dir {OUTPUT_DIR}x",
        "/venv/bin/python -u launch/train.py --local_rank=0 --recipe quickstart --output-dir runs/t.1+xx",
    ]
    must_match = [f"/venv/bin/python3.11 -u launch/train.py --local_rank=3 {rest}",
                  f"/venv/bin/python -u launch/train.py --local_rank=0 --recipe q --output-dir {OUTPUT_DIR}"]
    for line in must_not_match + must_match:
        hit = subprocess.run(["grep", "-Eq", "--", pattern], input=line, text=True).returncode == 0
        assert hit == (line in must_match), line


def test_sbatch_finished_run_is_not_requeued(tmp_path):
    fake, proc = start_job(tmp_path, "slurm_sbatch", mode="finish")
    rc, log = finish(proc)
    assert rc == 0, log
    assert not (fake["log"] / "requeue").exists()


@pytest.mark.timeout(120)
def test_srun_sets_torch_distributed_env_and_forwards_stop(tmp_path):
    fake, proc = start_job(tmp_path, "slurm_srun")
    out_dir = fake["repo"] / OUTPUT_DIR
    trainers = wait_for_trainers(out_dir, 4, proc)
    proc.send_signal(signal.SIGUSR1)
    rc, log = finish(proc)
    assert rc == 0, log
    envs = sorted((t["env"] for t in trainers), key=lambda e: int(e["RANK"]))
    assert [(e["RANK"], e["LOCAL_RANK"]) for e in envs] == [("0", "0"), ("1", "1"), ("2", "0"), ("3", "1")]
    assert {(e["WORLD_SIZE"], e["LOCAL_WORLD_SIZE"], e["MASTER_ADDR"], e["MASTER_PORT"]) for e in envs} == {
        ("4", "2", "nodeA", "29511")}
    for t in trainers:
        assert t["argv"] == ["--recipe", "quickstart", "--output-dir", OUTPUT_DIR, "--set", "stages.0.steps=3"]
        assert (out_dir / f"saved-{t['pid']}").read_text() == "USR1"
    assert (fake["log"] / "requeue").read_text().split() == ["4242"]


def test_srun_failed_run_keeps_status_and_is_not_requeued(tmp_path):
    fake, proc = start_job(tmp_path, "slurm_srun")
    trainers = wait_for_trainers(fake["repo"] / OUTPUT_DIR, 4, proc)
    os.kill(trainers[0]["pid"], signal.SIGKILL)  # a trainer we started (through the fake srun) crashes
    for t in trainers[1:]:
        os.kill(t["pid"], signal.SIGUSR1)
    rc, log = finish(proc)
    assert rc != 0
    assert not (fake["log"] / "requeue").exists()
    assert re.search(r"srun exited with status [1-9]", log)
