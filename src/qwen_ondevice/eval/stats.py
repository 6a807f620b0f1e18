"""Small-sample statistics for pass/fail benchmarks, in pure Python.

* :func:`wilson_interval`: a confidence interval for a pass rate k/n (Wilson 1927), which unlike
  the normal-approximation interval stays inside [0, 1] and behaves well near 0 and 1.
* :func:`mcnemar_exact`: the exact McNemar test (McNemar 1947) for two models scored on the same
  tasks, which looks only at the discordant tasks (solved by one model and not the other).
* :func:`mean_interval`: a normal-approximation confidence interval for a mean from batch means
  (consecutive tokens are correlated, so the caller averages blocks of them first; the method of
  batch means, e.g. Law and Kelton, "Simulation Modeling and Analysis", section 9.5.3).

References:
    E. B. Wilson (1927), "Probable inference, the law of succession, and statistical
    inference", Journal of the American Statistical Association 22(158):209-212.
    Q. McNemar (1947), "Note on the sampling error of the difference between correlated
    proportions or percentages", Psychometrika 12(2):153-157. The exact form used here is the
    two-sided binomial (sign) test on the discordant pairs.
"""

from __future__ import annotations

import math

#: The two-sided 95% standard normal quantile, Phi^-1(0.975).
Z_95 = 1.959963984540054


def wilson_interval(k: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval for a proportion: ``k`` successes out of ``n`` trials.

    With p = k/n, the bounds are
    ``(p + z^2/(2n) -+ z * sqrt(p(1-p)/n + z^2/(4n^2))) / (1 + z^2/n)``,
    the two solutions pi of ``(p - pi)^2 = z^2 pi (1 - pi) / n`` (Wilson 1927).

    Args:
        k: number of successes, 0 <= k <= n.
        n: number of trials, n >= 1.
        z: standard normal quantile of the confidence level (the default gives 95%).

    Returns:
        ``(low, high)`` with 0 <= low <= k/n <= high <= 1; ``low`` is exactly 0.0 when k == 0 and
        ``high`` exactly 1.0 when k == n.

    Raises:
        ValueError: ``n < 1``, ``k`` outside [0, n], or ``z`` not positive and finite.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, n] = [0, {n}], got {k}")
    if not (z > 0 and math.isfinite(z)):
        raise ValueError(f"z must be a positive number, got {z}")
    p = k / n
    z2 = z * z
    denominator = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half_width = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denominator
    low = 0.0 if k == 0 else max(0.0, centre - half_width)
    high = 1.0 if k == n else min(1.0, centre + half_width)
    return low, high


def mcnemar_exact(b: int, c: int) -> float:
    """The two-sided exact McNemar p-value for paired pass/fail outcomes (McNemar 1947).

    ``b`` counts the tasks only the first model solves and ``c`` those only the second solves.
    Under the null hypothesis (both models equally good) each of the ``b + c`` discordant tasks
    is equally likely to go either way, so the p-value is
    ``min(1, 2 * P(X <= min(b, c)))`` with ``X ~ Binomial(b + c, 1/2)``, computed exactly.

    Args:
        b: discordant tasks won by the first model, >= 0.
        c: discordant tasks won by the second model, >= 0.

    Returns:
        The p-value in (0, 1]; 1.0 when ``b + c == 0`` (no evidence either way).

    Raises:
        ValueError: ``b`` or ``c`` is negative.
    """
    if b < 0 or c < 0:
        raise ValueError(f"b and c must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)


def mean_interval(values: list[float], z: float = Z_95) -> tuple[float, float, float]:
    """The mean of ``values`` and its normal-approximation confidence interval,
    ``mean -+ z * s / sqrt(k)`` with ``s`` the sample standard deviation (k - 1 in the
    denominator) of the k values.

    Meant for batch means: pass the means of k blocks of consecutive, correlated observations
    (tokens of a text), not the observations themselves, and k of at least about 20 so that the
    normal quantile fits (Law and Kelton, "Simulation Modeling and Analysis", section 9.5.3).

    Returns:
        ``(mean, low, high)``.

    Raises:
        ValueError: fewer than two values, or ``z`` not positive and finite.
    """
    k = len(values)
    if k < 2:
        raise ValueError(f"need at least two values for an interval, got {k}")
    if not (z > 0 and math.isfinite(z)):
        raise ValueError(f"z must be a positive number, got {z}")
    mean = math.fsum(values) / k
    s = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (k - 1))
    half = z * s / math.sqrt(k)
    return mean, mean - half, mean + half
