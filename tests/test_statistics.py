"""Is a difference real? The figures of pipeline/stats.py on constructed verdicts, against textbook values, and the
verdict in words that evaluate.py prints."""

import math

import pytest

from pipeline import scoring, stats


def solved(gained: int, lost: int, both: int = 0, neither: int = 0) -> tuple[list[int], list[int]]:
    """Two models' verdicts on the same problems: `gained` solved by the second only, `lost` by the first only."""
    first = [0] * gained + [1] * lost + [1] * both + [0] * neither
    second = [1] * gained + [0] * lost + [1] * both + [0] * neither
    return first, second


@pytest.mark.parametrize("gained, lost, expected", [
    (4, 0, 2 / 2 ** 4),  # the demo of old: 4 gained of 9, nothing lost: p = 0.125
    (6, 0, 2 / 2 ** 6),  # the fewest discordant problems that can reach p < 0.05
    (10, 2, 2 * (1 + 12 + 66) / 2 ** 12),  # two-sided: 2 * P(Binomial(12, 1/2) <= 2) = 0.0386
    (5, 5, 1.0),
    (0, 7, 2 / 2 ** 7),  # worse is as sure as better
])
def test_the_p_value_is_the_exact_mcnemar_test_of_the_problems_that_changed(gained, lost, expected):
    first, second = solved(gained, lost, both=3, neither=5)  # problems both or neither solve change nothing
    found = stats.compare(first, second)
    assert found["test"] == "exact McNemar" and (found["gained"], found["lost"]) == (gained, lost)
    assert found["p_value"] == pytest.approx(expected, rel=1e-9)


def test_the_difference_and_its_bootstrap_interval_are_reproducible_and_hold_the_difference():
    first, second = solved(12, 4, both=20, neither=24)
    once, again = stats.compare(first, second), stats.compare(first, second)
    assert once == again  # seeded: the same report on every run
    assert once["difference"] == pytest.approx(8 / 60)
    low, high = once["interval"]
    assert low < once["difference"] < high
    # Paired: each problem's two verdicts are resampled together. The width is that of the textbook paired interval,
    # 2 x 1.96 x sqrt((b + c) / n^2 - d^2 / n) = 0.25, not the 0.35 of two independent proportions.
    paired = 2 * 1.96 * math.sqrt(16 / 60 ** 2 - (8 / 60) ** 2 / 60)
    assert high - low == pytest.approx(paired, abs=0.03) and paired < 0.26


def test_one_models_interval_is_the_exact_clopper_pearson_one():
    assert stats.mean_interval([0] * 22) == pytest.approx([0.0, 1 - 0.025 ** (1 / 22)])  # [0, 15.4 %], not [0, 0]
    assert stats.mean_interval([1] * 10) == pytest.approx([0.025 ** (1 / 10), 1.0])
    assert stats.mean_interval([1] * 5 + [0] * 5) == pytest.approx([0.187086, 0.812914], abs=1e-6)  # tables' 5/10


def test_several_samples_per_problem_are_compared_by_the_signed_rank_test():
    # The textbook example of the Wilcoxon signed-rank test (Fisher's paired Zea mays heights, as in SciPy's
    # documentation): the differences below give p = 0.0413 (exact, two-sided).
    differences = [6, 8, 14, 16, 23, 24, 28, 29, 41, -48, 49, 56, 60, -67, 75]
    first = [max(0, -d) / 100 for d in differences]
    second = [max(0, d) / 100 for d in differences]
    found = stats.compare(first, second)
    assert found["test"] == "Wilcoxon signed-rank" and found["p_value"] == pytest.approx(0.04126, abs=1e-4)


@pytest.mark.parametrize("gained, lost, both, neither, words", [
    (4, 0, 0, 5, "+44.4 points [+11.1, +77.8], p = 0.12 (4 better, 0 worse of 9 problems): too few problems to tell"),
    (10, 0, 0, 12, "p = 0.002 (10 better, 0 worse of 22 problems): better, more than chance would explain"),
    (12, 10, 20, 18, "p = 0.83 (12 better, 10 worse of 60 problems): not distinguishable from noise on 60 problems"),
    (0, 9, 20, 11, "p = 0.0039 (0 better, 9 worse of 40 problems): worse, more than chance would explain"),
    (0, 0, 3, 6, "every one of the 9 problems scored alike: no difference"),
])
def test_the_verdict_says_in_words_what_the_figures_allow(gained, lost, both, neither, words):
    first, second = solved(gained, lost, both, neither)
    verdict = stats.verdict(stats.compare(first, second), "fine-tuned", "base")
    assert verdict.startswith("fine-tuned vs base: ") and verdict.endswith(words)


def summary(per_problem: dict[str, float]) -> dict:
    scores = list(per_problem.values())
    return {"pass@1": sum(scores) / len(scores),
            "per_problem": {task: {"pass@1": score} for task, score in per_problem.items()},
            "intervals": {"pass@1": stats.mean_interval(scores)}, "problems": len(scores), "candidates": len(scores),
            "counts": {"passed": int(sum(scores)), "failed": 0, "timeout": 0, "error": len(scores) - int(sum(scores))}}


def test_every_model_is_compared_with_the_reference_problem_by_problem():
    problems = [{"task_id": str(i), "task": "", "code": f"def f{i}(): pass"} for i in range(4)]
    models = {"base": summary({"0": 1, "1": 0, "2": 0, "3": 0}), "r8": summary({"0": 1, "1": 1, "2": 0, "3": 0}),
              "r16": summary({"0": 0, "1": 1, "2": 1, "3": 0})}
    compared = scoring.compare_models(problems, models, "base")
    assert set(compared) == {"r8", "r16"}
    assert compared["r8"]["changes"] == {"gained": ["1 f1"], "lost": []}
    assert compared["r16"]["changes"] == {"gained": ["1 f1", "2 f2"], "lost": ["0 f0"]}
    assert compared["r16"]["verdict"].startswith("r16 vs base: +25.0 points")
    # Which model solved which: every problem where they differ, one column per model, in the table's order.
    assert scoring.matrix(problems, models, only_differing=True).splitlines() == [
        "| problem | base | r8 | r16 |", "|---|---|---|---|",
        "| 0 f0 | ✓ | ✓ | ✗ |", "| 1 f1 | ✗ | ✓ | ✓ |", "| 2 f2 | ✗ | ✗ | ✓ |"]
    table = scoring.markdown_table(models)
    low, high = (100 * value for value in models["base"]["intervals"]["pass@1"])
    assert f"| base | 4 | 25.0% [{low:.1f}, {high:.1f}] |" in table and math.isclose(low, 0.63, abs_tol=0.01)


def test_several_samples_per_problem_are_never_taken_for_solved_or_not():
    # Three samples per problem that happen to agree give 0/1 pass@1 estimates, still estimates: the signed-rank
    # test and a bootstrap interval, as for any other run with several samples, and the verdict names the test.
    first, second = solved(7, 0, both=3, neither=5)
    found = stats.compare(first, second, solved_or_not=False)
    assert found["test"] == "Wilcoxon signed-rank"
    assert "by the signed-rank test" in stats.verdict(found, "r8", "base")
    assert stats.mean_interval([1] * 5 + [0] * 5, solved_or_not=False) != stats.mean_interval([1] * 5 + [0] * 5)


def test_holm_adjusts_several_p_values_as_the_textbook_does():
    # Holm (1979): sorted 0.01, 0.03, 0.04 of 3 -> 3 x 0.01, max(0.03, 2 x 0.03), max(0.06, 1 x 0.04)
    assert stats.holm({"a": 0.01, "b": 0.04, "c": 0.03}) == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06})
    assert stats.holm({"a": 0.6, "b": 0.5}) == {"a": 1.0, "b": 1.0}  # never above 1
