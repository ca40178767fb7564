"""Run launch/cluster/k8s_entrypoint.sh against a fake torchrun: node rank from the pod index, the
torchrun command, and the stop path (SIGTERM -> SIGUSR1 to the trainers only -> exit 143)."""
import signal
import subprocess
from pathlib import Path

import pytest

from .fake_cluster import make_fake_cluster, wait_for_trainers

ENTRYPOINT = Path(__file__).resolve().parents[2] / "launch" / "cluster" / "k8s_entrypoint.sh"


def start_pod(tmp_path, mode="wait", **rank_env):
    fake = make_fake_cluster(tmp_path, fake_pkill=False)
    env = dict(fake["env"], NNODES="2", GPUS_PER_NODE="2", MASTER_ADDR="localhost", MASTER_PORT="29512",
               RTPURBO_RECIPE="quickstart", RTPURBO_OUTPUT_DIR="runs/k8s", RTPURBO_EXTRA_ARGS="--set a=1",
               FAKE_TRAINER_MODE=mode, **rank_env)
    proc = subprocess.Popen(["bash", str(ENTRYPOINT)], cwd=fake["repo"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    return fake, proc


@pytest.mark.timeout(120)
def test_indexed_job_pod_stops_with_checkpoint_and_retryable_status(tmp_path):
    fake, proc = start_pod(tmp_path, JOB_COMPLETION_INDEX="1", RANK="0")  # the Job index wins
    out_dir = fake["repo"] / "runs" / "k8s"
    trainers = wait_for_trainers(out_dir, 2, proc)
    assert sorted(t["env"]["RANK"] for t in trainers) == ["2", "3"]
    assert (fake["log"] / "torchrun.args").read_text() == (
        "--nnodes 2 --nproc-per-node 2 --node-rank 1 --master-addr localhost --master-port 29512 "
        "launch/train.py --recipe quickstart --output-dir runs/k8s --set a=1")
    proc.send_signal(signal.SIGTERM)  # what the kubelet sends on eviction
    out, _ = proc.communicate(timeout=60)
    # 143: retried by the restart policy, never counted as a finished run; torchrun itself survived
    assert proc.returncode == 143, out
    assert "torchrun exited with status 0" in out
    for t in trainers:
        assert (out_dir / f"saved-{t['pid']}").read_text() == "USR1"


def test_pytorchjob_rank_and_finished_run(tmp_path):
    fake, proc = start_pod(tmp_path, mode="finish", RANK="0")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "--node-rank 0 " in (fake["log"] / "torchrun.args").read_text()


@pytest.mark.parametrize("rank_env", [{}, {"RANK": "2"}, {"JOB_COMPLETION_INDEX": "x"}])
def test_invalid_node_rank_is_an_error(tmp_path, rank_env):
    _, proc = start_pod(tmp_path, **rank_env)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "no valid node rank" in out


@pytest.mark.parametrize("done, expected", [(False, 143), (True, 0)])
def test_done_file_tells_a_peer_stop_from_a_finished_run(tmp_path, done, expected):
    if done:
        (tmp_path / "repo" / "runs" / "k8s").mkdir(parents=True)
        (tmp_path / "repo" / "runs" / "k8s" / "DONE").write_text("")
    _, proc = start_pod(tmp_path, mode="finish", RANK="1", RTPURBO_DONE_FILE="DONE")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == expected, out
