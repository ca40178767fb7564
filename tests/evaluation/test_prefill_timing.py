"""Prefill timing: no warm-up forward on CPU, and the evaluate stage's `timing_runs` reach the evaluation."""
from types import SimpleNamespace

import torch

from rtpurbo_train.config.stages import EvaluateStage
from rtpurbo_train.evaluation.prefill_timing import time_forward
from rtpurbo_train.pipeline import stage_evaluate

from .test_eval_texts import TOK, _data


def test_cpu_timing_runs_each_forward_once_without_warmup():
    calls = []
    times = time_forward(lambda: calls.append(1), torch.device("cpu"), runs=2)
    assert len(times) == 2 and len(calls) == 2 and all(t >= 0 for t in times)
    calls.clear()
    time_forward(lambda: calls.append(1), torch.device("cpu"), runs=2, warmup=1)
    assert len(calls) == 3


def test_evaluate_stage_passes_timing_runs(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(stage_evaluate, "evaluate", lambda *args, **kwargs: seen.update(kwargs))
    data, _ = _data(tmp_path)
    ctx = SimpleNamespace(recipe=SimpleNamespace(data=data, seed=3), tokenizer=TOK, model=torch.nn.Linear(1, 1),
                          runtime=None, plan=None, out_dir=tmp_path, monitor=SimpleNamespace(info=lambda message: None))
    assert EvaluateStage().timing_runs == 3
    stage_evaluate.run_evaluate(ctx, EvaluateStage(timing_runs=1), "4-evaluate")
    assert seen["timing_runs"] == 1 and seen["seed"] == 3
