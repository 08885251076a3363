"""pass@k and a model's summary, from verdicts."""

import math

import pytest

from pipeline import scoring


@pytest.mark.parametrize("n, c, k, expected", [
    (1, 1, 1, 1.0), (1, 0, 1, 0.0), (5, 2, 1, 0.4),
    (5, 2, 2, 1 - math.comb(3, 2) / math.comb(5, 2)),  # 0.7
    (10, 3, 5, 1 - math.comb(7, 5) / math.comb(10, 5)),  # 1 - 21/252
    (4, 3, 2, 1.0),  # fewer failures than k: some sample must pass
])
def test_pass_at_k_matches_the_unbiased_estimator(n, c, k, expected):
    assert scoring.pass_at_k(n, c, k) == pytest.approx(expected)


def test_summary_averages_pass_at_k_over_problems():
    rows = [{"task_id": "a", "status": "passed"}, {"task_id": "a", "status": "failed"},
            {"task_id": "b", "status": "timeout"}, {"task_id": "b", "status": "error"}]
    summary = scoring.summarize(rows, num_samples=2)
    assert summary["pass@1"] == pytest.approx(0.25) and summary["pass@2"] == pytest.approx(0.5)
    assert summary["counts"] == {"passed": 1, "failed": 1, "timeout": 1, "error": 1} and summary["problems"] == 2
