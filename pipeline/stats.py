"""Is a difference real? Two models scored on the same problems, compared problem by problem.

    paired bootstrap    the difference of pass@1 (or pass@k) with a 95 % interval: the problems resampled with
                        replacement, both models' verdicts on each kept together (scipy.stats.bootstrap, seeded)
    exact McNemar       the p-value of the problems only one of the two solves: under "no difference" each of them
                        is equally likely to go either way, so the count is binomial(n, 1/2) (scipy.stats.binomtest);
                        with several samples per problem (fractions, not solved-or-not), the Wilcoxon signed-rank
                        test of the per-problem differences (scipy.stats.wilcoxon)

    exact binomial      one model's pass@1 with its 95 % interval (Clopper-Pearson; a bootstrap for pass@k of
                        several samples)

The verdict says in words what the figures allow. Nothing heavy is imported at module level.
"""

from __future__ import annotations

LEVEL = 0.95
RESAMPLES = 10_000
SEED = 0  # the same interval on every run of the same verdicts
SIGNIFICANT = 0.05
FEW_PROBLEMS = 30  # below this many, a difference is reported as "too few problems to tell" unless significant


def holm(p_values: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjustment of several p-values against one reference: with k comparisons, one p < 0.05 by
    chance alone is up to k times as likely; an adjusted p below 0.05 keeps the chance of any false "better" at
    5 % for the whole family (Holm 1979)."""
    ordered = sorted(p_values, key=p_values.get)
    adjusted, running = {}, 0.0
    for rank, label in enumerate(ordered):
        running = max(running, min(1.0, (len(ordered) - rank) * p_values[label]))
        adjusted[label] = running
    return {label: adjusted[label] for label in p_values}


def compare(reference: list[float], other: list[float], seed: int = SEED, solved_or_not: bool | None = None) -> dict:
    """`other` against `reference`, given each one's score per problem (1/0 for solved, or a pass@k estimate),
    problem for problem in the same order: the difference in points, its 95 % interval, the problems on which
    each does better, and the p-value of those: the exact McNemar test for solved-or-not scores, the Wilcoxon
    signed-rank test for fractions (several samples per problem)."""
    import numpy as np
    from scipy import stats

    if len(reference) != len(other) or not reference:
        raise ValueError("two models are compared on the same, non-empty list of problems")
    a, b = np.asarray(reference, dtype=float), np.asarray(other, dtype=float)
    gained, lost = int((b > a).sum()), int((a > b).sum())
    difference = float((b - a).mean())
    if gained + lost == 0:
        return {"problems": len(a), "difference": 0.0, "interval": [0.0, 0.0], "gained": 0, "lost": 0,
                "p_value": 1.0, "test": "none: every problem scored alike"}
    interval = stats.bootstrap((a, b), lambda x, y, axis: y.mean(axis) - x.mean(axis), paired=True,
                               vectorized=True, n_resamples=RESAMPLES, confidence_level=LEVEL,
                               method="percentile", rng=np.random.default_rng(seed)).confidence_interval
    if solved_or_not is None:  # not said: from the scores themselves
        solved_or_not = bool(np.all(np.isin(a, (0, 1))) and np.all(np.isin(b, (0, 1))))
    if solved_or_not:
        test, p_value = "exact McNemar", stats.binomtest(min(gained, lost), gained + lost, 0.5).pvalue
    else:
        test, p_value = "Wilcoxon signed-rank", stats.wilcoxon(b - a, zero_method="wilcox").pvalue
    return {"problems": len(a), "difference": difference, "interval": [float(interval.low), float(interval.high)],
            "gained": gained, "lost": lost, "p_value": float(p_value), "test": test}


def mean_interval(scores: list[float], seed: int = SEED, solved_or_not: bool | None = None) -> list[float]:
    """A 95 % interval of one model's mean score over problems (its pass@k). Solved-or-not scores (greedy pass@1)
    are a binomial count: the exact Clopper-Pearson interval, which also gives 0 of 22 an honest [0, 15.4 %] where a
    bootstrap of 22 zeros could only say [0, 0]. Fractions (pass@k of several samples): a bootstrap over problems."""
    import numpy as np
    from scipy import stats

    values = np.asarray(scores, dtype=float)
    if not len(values):
        return [0.0, 0.0]
    if solved_or_not is None:
        solved_or_not = bool(np.all((values == 0) | (values == 1)))
    if solved_or_not:
        interval = stats.binomtest(int(values.sum()), len(values)).proportion_ci(LEVEL, method="exact")
        return [float(interval.low), float(interval.high)]
    if np.all(values == values[0]):
        return [float(values[0]), float(values[0])]
    interval = stats.bootstrap((values,), np.mean, vectorized=True, n_resamples=RESAMPLES, confidence_level=LEVEL,
                               method="percentile", rng=np.random.default_rng(seed)).confidence_interval
    return [float(interval.low), float(interval.high)]


def verdict(comparison: dict, name: str, reference: str) -> str:
    """One sentence of what the figures allow, for a course report."""
    points = 100 * comparison["difference"]
    low, high = (100 * value for value in comparison["interval"])
    p, n = comparison["p_value"], comparison["problems"]
    changed = f"{comparison['gained']} better, {comparison['lost']} worse"
    test = " by the signed-rank test" if comparison.get("test") == "Wilcoxon signed-rank" else ""
    figures = f"{points:+.1f} points [{low:+.1f}, {high:+.1f}], p = {p:.2g}{test} ({changed} of {n} problems)"
    if comparison["gained"] == comparison["lost"] == 0:
        return f"{name} vs {reference}: every one of the {n} problems scored alike: no difference"
    if p < SIGNIFICANT and low * high > 0:
        direction = "better" if points > 0 else "worse"
        return f"{name} vs {reference}: {figures}: {direction}, more than chance would explain"
    if n < FEW_PROBLEMS:
        return f"{name} vs {reference}: {figures}: too few problems to tell"
    return f"{name} vs {reference}: {figures}: not distinguishable from noise on {n} problems"
