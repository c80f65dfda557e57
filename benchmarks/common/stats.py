"""Paired confidence intervals for the evidence benchmark (no SciPy needed).

For paired samples ``d_s = a_s - b_s`` over ``n`` distillation seeds (same experts and initial
images per seed), the 95% interval of the mean difference is

    mean(d) +- t_{0.975, n-1} * sd(d) / sqrt(n),      sd with the n - 1 denominator,

and a difference is *called* only when that interval excludes 0. ``t_quantile`` inverts the
Student-t CDF by bisection; the CDF is Simpson's rule on the density (exact to ~1e-12 for
the quantiles used here).
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


def t_pdf(x: float, df: int) -> float:
    """Student-t density with ``df`` degrees of freedom."""
    c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(c - (df + 1) / 2 * math.log1p(x * x / df))


def t_cdf(x: float, df: int, intervals: int = 4000) -> float:
    """P(T <= x): 1/2 + the integral of the density from 0 to |x| (Simpson), signed."""
    if x == 0:
        return 0.5
    a = abs(x)
    # integrate in u = atan(t) so that the heavy tail of df = 1 stays on a finite interval
    top = math.atan(a)
    h = top / intervals

    def f(u: float) -> float:
        t = math.tan(u)
        return t_pdf(t, df) * (1 + t * t)

    s = f(0.0) + f(top)
    s += 4 * sum(f((2 * k - 1) * h) for k in range(1, intervals // 2 + 1))
    s += 2 * sum(f(2 * k * h) for k in range(1, intervals // 2))
    half = s * h / 3
    return 0.5 + half if x > 0 else 0.5 - half


@functools.lru_cache(maxsize=256)
def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t (bisection on `t_cdf`; cached)."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if not (isinstance(df, int) and df >= 1):
        raise ValueError(f"df must be an int >= 1, got {df!r}")
    if p == 0.5:
        return 0.0
    sign = 1.0 if p > 0.5 else -1.0
    target = p if p > 0.5 else 1 - p
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < target:
        hi *= 2
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < target else (lo, mid)
    return sign * (lo + hi) / 2


@dataclass(frozen=True)
class Paired:
    """Mean paired difference, its 95% interval and whether the interval excludes 0."""

    n: int
    mean: float
    low: float
    high: float

    @property
    def called(self) -> bool:
        return self.n >= 2 and (self.low > 0 or self.high < 0)


def paired_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Paired:
    """The paired ``level`` interval of ``mean(a - b)`` (``a[s]`` and ``b[s]`` share seed s)."""
    if len(a) != len(b):
        raise ValueError(f"paired samples need equal lengths, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b, strict=True)]
    n = len(d)
    if n == 0:
        return Paired(0, math.nan, math.nan, math.nan)
    mean = statistics.fmean(d)
    if n == 1:
        return Paired(1, mean, math.nan, math.nan)
    half = t_quantile(0.5 + level / 2, n - 1) * statistics.stdev(d) / math.sqrt(n)
    return Paired(n, mean, mean - half, mean + half)
