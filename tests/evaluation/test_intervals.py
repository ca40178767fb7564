"""Confidence intervals of the needle report: Wilson against published values, the paired bootstrap by its
behaviour on cases whose answer is known."""
import pytest

from rtpurbo_train.evaluation.intervals import paired_ratio_interval, wilson_interval


@pytest.mark.parametrize("correct,total,expected", [
    (8, 10, (0.4902, 0.9433)),   # textbook Wilson 95% intervals
    (0, 10, (0.0, 0.2775)),
    (10, 10, (0.7225, 1.0)),
    (38, 40, (0.8350, 0.9862)),
])
def test_wilson_matches_published_values(correct, total, expected):
    low, high = wilson_interval(correct, total)
    assert (low, high) == pytest.approx(expected, abs=1e-4)


def test_wilson_without_prompts_is_nan():
    low, high = wilson_interval(0, 0)
    assert low != low and high != high


def test_paired_ratio_interval_on_known_cases():
    dense = [True] * 30 + [False] * 10
    # identical answers: every resample has ratio exactly 1
    assert paired_ratio_interval(dense, dense) == (1.0, 1.0)
    # the sparse model never answers: ratio 0 in every resample
    assert paired_ratio_interval(dense, [False] * 40) == (0.0, 0.0)
    # sparse loses 6 of the 30 dense hits: point 0.8 inside, strictly below 1, and deterministic for a seed
    sparse = [True] * 24 + [False] * 16
    low, high = paired_ratio_interval(dense, sparse)
    assert 0.6 < low < 0.8 < high < 1.0 + 1e-12
    assert paired_ratio_interval(dense, sparse) == (low, high)
    # four times the prompts, the same rates: a narrower interval
    low4, high4 = paired_ratio_interval(dense * 4, sparse * 4)
    assert high4 - low4 < 0.7 * (high - low)
    # no dense hit at all: undefined
    nan_low, _ = paired_ratio_interval([False] * 5, [True] * 5)
    assert nan_low != nan_low
