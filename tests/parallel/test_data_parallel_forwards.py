"""Calibration and evaluate() on two gloo ranks: each rank runs its share of the calibration documents, needle
prompts, perplexity documents and timed lengths, and both get the one-process results; with a
ZeRO-3-partitioned model every rank runs every forward."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.helpers import REPO, env, free_port

from .forwards_worker import LENGTHS, run

WORKER = Path(__file__).with_name("forwards_worker.py")


def _two_ranks(out: Path, zero3: bool) -> list[dict]:
    out.mkdir()
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(WORKER), "--out", str(out), *(["--zero3"] if zero3 else [])],
                              cwd=REPO, env=env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                                MASTER_PORT=port),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    for proc in procs:
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return run(tmp_path_factory.mktemp("single"))


@pytest.mark.parametrize("zero3", [False, True])
def test_two_ranks_share_the_forwards_and_gather_the_one_process_results(tmp_path, single, zero3):
    ranks = _two_ranks(tmp_path / "two", zero3)
    for key in ("calibration_forwards", "forwards"):
        if zero3:
            assert [r[key] for r in ranks] == [single[key]] * 2, key
        else:  # calibration documents 0, 2 / 1; prompts 0, 2 / 1, 3; perplexity documents 0, 2 / 1; lengths 320 / 448
            assert sum(r[key] for r in ranks) == single[key] and all(0 < r[key] < single[key] for r in ranks), key
    want = single["results"]
    for rank in ranks:
        assert rank["scores"] == single["scores"]  # the same per-document scores, averaged in the same order
        got = rank["results"]
        assert got["needle"]["prompts"] == want["needle"]["prompts"]
        assert (got["needle"]["dense"], got["needle"]["sparse"]) == (want["needle"]["dense"], want["needle"]["sparse"])
        for n in map(str, LENGTHS):
            metrics, expected = got["attention"]["by_length"][n], want["attention"]["by_length"][n]
            assert metrics.keys() == expected.keys() and "recall/mean" in metrics
            for key, value in expected.items():
                assert metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (n, key)
            assert got["prefill"]["by_length"][n]["tokens"] == want["prefill"]["by_length"][n]["tokens"]
        assert list(got["prefill"]["by_length"]) == list(map(str, LENGTHS))
        ppl, expected = got["perplexity"], want["perplexity"]
        assert ppl["docs"] == expected["docs"] == 3
        for key in ("dense", "sparse", "rel_increase"):
            assert ppl[key] == pytest.approx(expected[key], rel=1e-9)
        for bucket, expected_bucket in zip(ppl["buckets"], expected["buckets"], strict=True):
            assert bucket["tokens"] == expected_bucket["tokens"]
            assert bucket["sparse_ppl"] == pytest.approx(expected_bucket["sparse_ppl"], rel=1e-9)
    assert (tmp_path / "two" / "eval" / "report.md").is_file()
