"""Is a difference real? Two models scored on the same problems, compared problem by problem.

    paired bootstrap    the difference of pass@1 (or pass@k) with a 95 % interval: the problems resampled with
                        replacement, both models' verdicts on each kept together (scipy.stats.bootstrap, seeded)
    exact McNemar       the p-value of the problems only one of the two solves: under "no difference" each of them
                        is equally likely to go either way, so the count is binomial(n, 1/2) (scipy.stats.binomtest)

The verdict says in words what the figures allow. Nothing heavy is imported at module level.
"""

from __future__ import annotations

LEVEL = 0.95
RESAMPLES = 10_000
SEED = 0  # the same interval on every run of the same verdicts
SIGNIFICANT = 0.05
FEW_PROBLEMS = 30  # below this many, a difference is reported as "too few problems to tell" unless significant


def compare(reference: list[float], other: list[float], seed: int = SEED) -> dict:
    """`other` against `reference`, given each one's score per problem (1/0 for solved, or a pass@k estimate),
    problem for problem in the same order: the difference in points, its 95 % interval, the problems each
    solves that the other does not, and the exact McNemar p-value on those."""
    import numpy as np
    from scipy import stats

    if len(reference) != len(other) or not reference:
        raise ValueError("two models are compared on the same, non-empty list of problems")
    a, b = np.asarray(reference, dtype=float), np.asarray(other, dtype=float)
    gained, lost = int(((b > a) & (a == 0)).sum()), int(((a > b) & (b == 0)).sum())
    difference = float((b - a).mean())
    if np.all(a == b):
        low = high = 0.0  # no problem went either way: nothing to resample
    else:
        interval = stats.bootstrap((a, b), lambda x, y, axis: y.mean(axis) - x.mean(axis), paired=True,
                                   vectorized=True, n_resamples=RESAMPLES, confidence_level=LEVEL,
                                   method="percentile", rng=np.random.default_rng(seed)).confidence_interval
        low, high = float(interval.low), float(interval.high)
    discordant = gained + lost
    p_value = float(stats.binomtest(min(gained, lost), discordant, 0.5).pvalue) if discordant else 1.0
    return {"problems": len(a), "difference": difference, "interval": [low, high], "gained": gained, "lost": lost,
            "p_value": p_value}


def mean_interval(scores: list[float], seed: int = SEED) -> list[float]:
    """A 95 % bootstrap interval of one model's mean score over problems (its pass@k)."""
    import numpy as np
    from scipy import stats

    values = np.asarray(scores, dtype=float)
    if len(values) < 2 or np.all(values == values[0]):
        return [float(values.mean()), float(values.mean())] if len(values) else [0.0, 0.0]
    interval = stats.bootstrap((values,), np.mean, vectorized=True, n_resamples=RESAMPLES, confidence_level=LEVEL,
                               method="percentile", rng=np.random.default_rng(seed)).confidence_interval
    return [float(interval.low), float(interval.high)]


def verdict(comparison: dict, name: str, reference: str) -> str:
    """One sentence of what the figures allow, for a course report."""
    points = 100 * comparison["difference"]
    low, high = (100 * value for value in comparison["interval"])
    p, n = comparison["p_value"], comparison["problems"]
    changed = f"{comparison['gained']} gained, {comparison['lost']} lost"
    figures = f"{points:+.1f} points [{low:+.1f}, {high:+.1f}], p = {p:.2g} ({changed} of {n})"
    if comparison["gained"] == comparison["lost"] == 0:
        return f"{name} vs {reference}: the same problems solved ({n}): no difference"
    if p < SIGNIFICANT and low * high > 0:
        direction = "better" if points > 0 else "worse"
        return f"{name} vs {reference}: {figures}: {direction}, more than chance would explain"
    if n < FEW_PROBLEMS:
        return f"{name} vs {reference}: {figures}: too few problems to tell"
    return f"{name} vs {reference}: {figures}: not distinguishable from noise on {n} problems"
