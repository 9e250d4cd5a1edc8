"""Statistics of the reports: Student-t quantiles and t-intervals over seeds.

The t distribution's CDF for an integer number of degrees of freedom ``df`` has a finite closed
form (Abramowitz & Stegun 26.7.3-4, in ``theta = atan(t / sqrt(df))``); :func:`t_quantile`
inverts it by bisection, so no SciPy is needed and the quantile is exact to float precision.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import NamedTuple

__all__ = ["Interval", "t_central_probability", "t_interval", "t_quantile"]


def t_central_probability(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with ``df`` >= 1 (integer) degrees of freedom, t >= 0."""
    if df < 1 or int(df) != df:
        raise ValueError(f"t_central_probability: df = {df} must be an integer >= 1")
    if t <= 0:
        return 0.0
    if math.isinf(t):
        return 1.0
    theta = math.atan(t / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2:  # odd: (2/pi) (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...))
        term, total = 1.0, 1.0 if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        return 2.0 / math.pi * (theta + s * math.cos(theta) * total)
    term, total = 1.0, 1.0  # even: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)
    for k in range(1, df // 2):
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return s * total


def t_quantile(p: float, df: int) -> float:
    """The ``p``-quantile (0 < p < 1) of Student's t with ``df`` (integer >= 1) degrees of
    freedom, e.g. ``t_quantile(0.975, 2) = 4.3027``."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile: p = {p} must be in (0, 1)")
    if p == 0.5:
        return 0.0
    central = abs(2.0 * p - 1.0)
    lo, hi = 0.0, 1.0
    while t_central_probability(hi, df) < central:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):  # bisection to the float resolution of the bracket
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if t_central_probability(mid, df) < central:
            lo = mid
        else:
            hi = mid
    q = 0.5 * (lo + hi)
    return q if p > 0.5 else -q


class Interval(NamedTuple):
    """A mean with its two-sided t-interval over ``n`` values (``low``/``high`` are None when
    n < 2: one value gives no interval)."""

    mean: float
    low: float | None
    high: float | None
    n: int
    sd: float | None
    level: float


def t_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """mean ± t_{(1+level)/2, n-1} · sd / sqrt(n) of ``values`` (n >= 1)."""
    n = len(values)
    if n == 0:
        raise ValueError("t_interval: no values")
    mean = statistics.fmean(values)
    if n == 1:
        return Interval(mean, None, None, 1, None, level)
    sd = statistics.stdev(values)
    half = t_quantile(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, sd, level)
