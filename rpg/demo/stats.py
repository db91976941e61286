r"""Means and 95% intervals over seeds (Student-t), for numbers and for curves.

For n seeds with mean m and sample standard deviation s (n − 1 in the
denominator), the interval is m ± t_{0.975, n−1}·s/√n. The t quantile is
computed exactly (the closed-form CDF of Student's t for integer degrees of
freedom, inverted by bisection), so no SciPy is needed.
"""

from __future__ import annotations

import math


def t_cdf_two_sided(t: float, df: int) -> float:
    r"""P(|T| ≤ t) for Student's t with ``df`` ≥ 1 degrees of freedom (Abramowitz & Stegun 26.7.3–4)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df!r}")
    theta = math.atan(t / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2 == 0:  # sinθ·(1 + ½cos²θ + (1·3)/(2·4)cos⁴θ + … up to cos^{df−2}θ)
        term, total = 1.0, 1.0
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        return s * total
    if df == 1:
        return 2 * theta / math.pi
    term, total = 1.0, 1.0  # (2/π)(θ + sinθ·cosθ·(1 + (2/3)cos²θ + … up to cos^{df−3}θ))
    for k in range(1, (df - 1) // 2):
        term *= c2 * (2 * k) / (2 * k + 1)
        total += term
    return 2 / math.pi * (theta + s * math.cos(theta) * total)


def t_quantile(df: int, level: float = 0.95) -> float:
    """The two-sided ``level`` quantile of Student's t: P(|T| ≤ q) = level."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    lo, hi = 0.0, 1.0
    while t_cdf_two_sided(hi, df) < level:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf_two_sided(mid, df) < level else (lo, mid)
    return (lo + hi) / 2


def mean_ci(values, level: float = 0.95) -> tuple[float, float]:
    """(mean, half-width of the ``level`` Student-t interval); the half-width is NaN for one value."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        raise ValueError("mean_ci needs at least one value")
    m = sum(xs) / n
    if n == 1:
        return m, float("nan")
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    return m, t_quantile(n - 1, level) * s / math.sqrt(n)


def curve_ci(curves, level: float = 0.95) -> tuple[list[float], list[float]]:
    """Pointwise (mean, half-width) of equally long curves, one per seed."""
    pairs = [mean_ci(column, level) for column in zip(*curves, strict=False)]
    return [m for m, _ in pairs], [h for _, h in pairs]


def fmt(values, digits: int = 3) -> str:
    """``"0.912 ± 0.031"`` (or just the mean for one value)."""
    m, h = mean_ci(values)
    return f"{m:.{digits}f}" if math.isnan(h) else f"{m:.{digits}f} ± {h:.{digits}f}"


def smooth(curve, window: int) -> list[float]:
    """Trailing moving average (the first points average what exists so far)."""
    out, acc = [], 0.0
    for i, x in enumerate(curve):
        acc += x
        if i >= window:
            acc -= curve[i - window]
        out.append(acc / min(i + 1, window))
    return out
