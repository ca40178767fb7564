"""Preemption (a signal to a running 2-rank job), non-finite losses, and a failed checkpoint save."""
import math
import os
import signal
import subprocess
import time

import psutil
import pytest
import torch

from rtpurbo_train.config import load_recipe
from rtpurbo_train.errors import UserError

from .helpers import REPO, TINY, deepspeed_cmd, env, free_port, losses_by_step, run


def test_sigusr1_saves_at_the_next_step_and_the_same_command_resumes(tmp_path):
    out = tmp_path / "run"
    cmd = deepspeed_cmd(2, "--recipe", str(TINY), "--output-dir", str(out))
    launcher = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    try:
        deadline = time.time() + 600
        while not ((out / "metrics.jsonl").exists() and 1 in losses_by_step(out, "2-sparse_train")):
            assert launcher.poll() is None and time.time() < deadline, "run ended before the signal"
            time.sleep(0.2)
        trainers = [p for p in psutil.Process(launcher.pid).children(recursive=True) if any(a.startswith("--local_rank") for a in p.cmdline())]
        assert len(trainers) == 2
        # like a cluster scheduler: only one rank is told; both must stop at the same step
        trainers[0].send_signal(signal.SIGUSR1)
        output, _ = launcher.communicate(timeout=600)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode == 0, output[-3000:]
    assert "preempted" in output
    stopped_at = int((out / "checkpoints" / "2-sparse_train" / "latest").read_text().split("_")[1])
    assert 1 <= stopped_at < 6 and not (out / "DONE").exists()

    resumed = run(deepspeed_cmd(2, "--recipe", str(TINY), "--output-dir", str(out)), timeout=900)
    assert f"resumed from checkpoint step {stopped_at}" in resumed.stdout
    assert (out / "DONE").exists()
    assert sorted(losses_by_step(out, "2-sparse_train")) == [1, 2, 3, 4, 5, 6]


@pytest.fixture
def in_process(monkeypatch, tmp_path):
    """Run the pipeline in this process (one rank) so faults can be injected."""
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.chdir(REPO)
    from rtpurbo_train.pipeline import run_recipe
    return run_recipe


def test_non_finite_losses_are_skipped_counted_and_abort_after_five_in_a_row(in_process, monkeypatch, tmp_path):
    from rtpurbo_train.trainer import loop

    real = loop.micro_batch_losses
    calls = {"n": 0, "poison": {3, 4}}

    def flaky(engine, teacher, runtime, batch, stage):
        calls["n"] += 1
        total, parts = real(engine, teacher, runtime, batch, stage)
        if stage.type == "sparse_train" and calls["n"] in calls["poison"]:
            total = total * float("nan")
        return total, parts

    monkeypatch.setattr(loop, "micro_batch_losses", flaky)
    recipe = load_recipe(str(TINY), ["stages.evaluate.samples_per_cell=1"])
    recipe.stages = recipe.stages[:3]
    warm_calls = recipe.stages[1].steps  # micro-batches before the sparse stage
    calls["poison"] = {warm_calls + 2, warm_calls + 3}
    ctx = in_process(recipe, str(tmp_path / "nan"))
    from .helpers import metrics
    rows = [m for m in metrics(ctx.out_dir) if m["stage"] == "2-sparse_train" and "train/loss" in m]
    assert [m["step"] for m in rows] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(m["train/loss"]) for m in rows)
    assert rows[-1]["train/skipped_batches"] == 2.0

    calls["n"], calls["poison"] = 0, set(range(warm_calls + 1, warm_calls + 100))
    with pytest.raises(UserError, match="5 non-finite losses in a row"):
        in_process(recipe, str(tmp_path / "nan_abort"))


def test_a_failed_save_keeps_the_previous_checkpoint(in_process, monkeypatch, tmp_path):
    from deepspeed.runtime.engine import DeepSpeedEngine

    real = DeepSpeedEngine.save_checkpoint
    saves = {"n": 0}

    def disk_full_on_second_save(self, save_dir, tag=None, **kw):
        saves["n"] += 1
        if saves["n"] == 2:
            real(self, save_dir, tag=tag, **kw)  # half of it lands, then the disk fills up
            raise OSError(28, "No space left on device")
        return real(self, save_dir, tag=tag, **kw)

    monkeypatch.setattr(DeepSpeedEngine, "save_checkpoint", disk_full_on_second_save)
    recipe = load_recipe(str(TINY))
    recipe.stages = recipe.stages[:2]  # calibrate, indexer_warmup (saves at steps 2 and 4)
    out = tmp_path / "full"
    with pytest.raises(UserError, match="No space left on device.*previous checkpoint is intact"):
        in_process(recipe, str(out))
    stage_dir = out / "checkpoints" / "1-indexer_warmup"
    assert (stage_dir / "latest").read_text() == "step_2"
    assert sorted(p.name for p in stage_dir.iterdir() if p.is_dir()) == ["step_2"]  # no half-written tmp-step_4
    assert (stage_dir / "step_2" / "rank_state_0.json").is_file()
    torch.load(next((stage_dir / "step_2").glob("mp_rank_*_model_states.pt")), weights_only=False)
