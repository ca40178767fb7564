"""End to end through the deepspeed launcher on CPU: 2 gloo ranks, ZeRO-2, tiny random GQA Llama."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from .helpers import REPO, TINY, deepspeed_cmd, env, losses_by_step, metrics, run


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "run"
    cmd = deepspeed_cmd(2, "--recipe", str(TINY), "--output-dir", str(out))
    proc = run(cmd, timeout=900)
    proc.master_port = cmd[cmd.index("--master_port") + 1]
    return out, proc


def test_cpu_ranks_leave_no_shared_memory_behind(full_run):
    # DeepSpeed's CPU all-reduce makes a 69 MB /dev/shm segment per rank; distributed.init removes it at exit.
    _, proc = full_run
    left = list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{proc.master_port}_*"))
    assert not left, left


def test_two_rank_run_writes_the_output_contract(full_run):
    out, proc = full_run
    for path in ("recipe.yaml", "plan.json", "metrics.jsonl", "report.md", "state.json", "calibration_heads.png",
                 "export/config.json", "checkpoints/1-indexer_warmup/final/model.safetensors",
                 "checkpoints/2-sparse_train/latest"):
        assert (out / path).exists(), path
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tensorboard").iterdir())
    rows = metrics(out)
    warm = [m for m in rows if m["stage"] == "1-indexer_warmup" and "train/loss" in m]
    sparse = [m for m in rows if m["stage"] == "2-sparse_train" and "train/loss" in m]
    assert [m["step"] for m in warm] == [1, 2, 3, 4] and [m["step"] for m in sparse] == [1, 2, 3, 4, 5, 6]
    for key in ("train/lr", "train/grad_norm", "train/tokens_per_s", "train/loss_distill", "train/loss_ssa_align",
                "train/loss_indexer_kl", "train/loss_lm", "sparsity/mean", "recall/mean"):
        assert key in sparse[-1], key
    assert "train/loss_indexer_kl" in warm[0] and "sparsity/mean" in warm[0]
    # per layer: sparsity, recall, indexer KL (layers with retrieval heads), SSA alignment (every layer)
    plan_layers = json.loads((out / "plan.json").read_text())["layers"]
    with_retrieval = [i for i, layer in enumerate(plan_layers) if layer["retrieval_kv_heads"]]
    assert with_retrieval
    for i in range(len(plan_layers)):
        assert f"sparsity/layer{i}" in sparse[-1] and f"recall/layer{i}" in sparse[-1]
        assert f"train/ssa_align/layer{i}" in sparse[-1]
        assert (f"train/indexer_kl/layer{i}" in sparse[-1]) == (i in with_retrieval)
    kl_layers = [sparse[-1][f"train/indexer_kl/layer{i}"] for i in with_retrieval]
    assert sum(kl_layers) / len(kl_layers) == pytest.approx(sparse[-1]["train/loss_indexer_kl"], rel=1e-4)
    # the indexer learns during warm-up
    assert warm[-1]["train/loss_indexer_kl"] < warm[0]["train/loss_indexer_kl"]
    # global steps continue across stages for TensorBoard
    assert sparse[0]["global_step"] == warm[-1]["global_step"] + 1
    # one progress stream: only rank 0 prints the run's log lines
    assert proc.stdout.count("starting recipe") == 1


def test_kill_and_resume_continues_the_same_run(full_run, tmp_path):
    reference, _ = full_run
    out = tmp_path / "run"
    cmd = deepspeed_cmd(2, "--recipe", str(TINY), "--output-dir", str(out))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 600
    try:
        # kill once the sparse stage has logged step 3 (its step-2 checkpoint is then complete)
        while time.time() < deadline:
            if (out / "metrics.jsonl").exists() and 3 in losses_by_step(out, "2-sparse_train"):
                break
            assert proc.poll() is None, "run ended before it could be killed"
            time.sleep(0.2)
        else:
            pytest.fail("the run never reached sparse step 3")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "report.md").exists()

    resumed = run(deepspeed_cmd(2, "--recipe", str(TINY), "--output-dir", str(out)), timeout=900)
    assert "resumed from checkpoint step" in resumed.stdout
    assert "1-indexer_warmup: already complete" in resumed.stdout
    expected = losses_by_step(reference, "2-sparse_train")
    got = losses_by_step(out, "2-sparse_train")
    assert sorted(got) == sorted(expected)
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-4, abs=1e-5), step
    assert (out / "report.md").exists()


def test_export_command_reproduces_the_export_stage(full_run, tmp_path):
    """`launch/export.py --run DIR` rebuilds the model from the run's recipe, plan and final weights:
    its folder must hold exactly the tensors the pipeline's export stage wrote (both float32)."""
    from safetensors.torch import load_file

    out, _ = full_run
    folder = tmp_path / "exported"
    run([sys.executable, str(REPO / "launch" / "export.py"), "--run", str(out), "--out", str(folder),
         "--dtype", "float32"])
    for name in ("model.safetensors", "rtpurbo_indexer.safetensors"):
        ours, stage = load_file(str(folder / name)), load_file(str(out / "export" / name))
        assert ours.keys() == stage.keys()
        for key in stage:
            assert torch.equal(ours[key], stage[key]), key


def test_evaluate_command_rewrites_the_report(full_run):
    out, _ = full_run
    before = (out / "report.md").stat().st_mtime
    run([sys.executable, str(REPO / "launch" / "evaluate.py"), "--run", str(out), "--lengths", "256",
         "--depths", "0.3", "--samples-per-cell", "1", "--backend", "reference"])
    assert (out / "report.md").stat().st_mtime > before
    assert "Context lengths [256], depths [0.3]" in (out / "report.md").read_text()
