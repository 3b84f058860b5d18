"""Statistics of the claim table: log-log fits with confidence intervals, verdicts, and how numbers are printed."""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Any

import numpy as np


class Verdict(StrEnum):
    """How a measurement stands against a claim; the value is what summary.json and the report say."""

    HOLDS = "holds"
    DIRECTION_ONLY = "direction only (exponent differs)"
    INCONCLUSIVE_CI_INCLUDES_ZERO = "inconclusive (CI includes 0)"
    INCONCLUSIVE_TOO_FEW_POINTS = "inconclusive (too few points)"
    DOES_NOT_HOLD = "does not hold"
    NOT_TESTABLE_NO_OPTIMUM = "not testable (no f★)"
    NOT_TESTABLE_NO_EXACT_GRADIENTS = "not testable (no exact gradients)"

    @classmethod
    def of(cls, holds: bool) -> Verdict:
        return cls.HOLDS if holds else cls.DOES_NOT_HOLD

    @property
    def testable(self) -> bool:
        return self not in (Verdict.NOT_TESTABLE_NO_OPTIMUM, Verdict.NOT_TESTABLE_NO_EXACT_GRADIENTS)


def fit_loglog(x, y, predicted: float | None = None) -> dict[str, Any]:
    """Least squares of log y on log x over the finite, positive points: slope, its 95% CI (stderr × t), R²."""
    from scipy import stats

    x, y = np.asarray(x, float), np.asarray(y, float)
    usable = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    log_x, log_y = np.log(x[usable]), np.log(y[usable])
    out: dict[str, Any] = {"n": int(usable.sum()), "predicted": predicted}
    if usable.sum() < 3 or np.ptp(log_x) == 0:
        out.update(slope=math.nan, lo=math.nan, hi=math.nan, intercept=math.nan, r2=math.nan)
        return out
    r = stats.linregress(log_x, log_y)
    half = float(r.stderr * stats.t.ppf(0.975, usable.sum() - 2))
    out.update(
        slope=float(r.slope),
        lo=float(r.slope - half),
        hi=float(r.slope + half),
        intercept=float(r.intercept),
        r2=float(r.rvalue**2),
    )
    return out


def verdict(fit: dict) -> Verdict:
    """holds: predicted exponent in the CI and the slope significant; direction only: right sign, other exponent."""
    slope, lo, hi, predicted = fit["slope"], fit["lo"], fit["hi"], fit["predicted"]
    if not math.isfinite(slope):
        return Verdict.INCONCLUSIVE_TOO_FEW_POINTS
    significant = lo > 0 or hi < 0
    if lo <= predicted <= hi:
        return Verdict.HOLDS if significant or predicted == 0 else Verdict.INCONCLUSIVE_CI_INCLUDES_ZERO
    if significant and np.sign(slope) == np.sign(predicted):
        return Verdict.DIRECTION_ONLY
    if predicted == 0:
        return Verdict.DOES_NOT_HOLD
    if significant or np.sign(slope) != np.sign(predicted):
        return Verdict.DOES_NOT_HOLD
    return Verdict.INCONCLUSIVE_CI_INCLUDES_ZERO


def linear_trend(x: np.ndarray, y: np.ndarray) -> dict:
    """Least squares of y on x: slope, its 95% CI (stderr × t), R², points."""
    from scipy import stats

    usable = np.isfinite(x) & np.isfinite(y)
    x, y = x[usable], y[usable]
    out = {"n": int(usable.sum()), "predicted": "slope > 0"}
    if len(x) < 3 or np.ptp(x) == 0:
        return {**out, "slope": math.nan, "lo": math.nan, "hi": math.nan, "r2": math.nan}
    r = stats.linregress(x, y)
    half = float(r.stderr * stats.t.ppf(0.975, len(x) - 2))
    return {**out, "slope": float(r.slope), "lo": r.slope - half, "hi": r.slope + half, "r2": float(r.rvalue**2)}


def trend_verdict(fit: dict) -> Verdict:
    """holds: the slope's CI lies above 0; does not hold: below 0."""
    if not math.isfinite(fit["slope"]):
        return Verdict.INCONCLUSIVE_TOO_FEW_POINTS
    if fit["lo"] > 0:
        return Verdict.HOLDS
    return Verdict.DOES_NOT_HOLD if fit["hi"] < 0 else Verdict.INCONCLUSIVE_CI_INCLUDES_ZERO


def format_number(value, digits: int = 3) -> str:
    """A number for a table cell: ``–`` for none or non-finite, integers as they are, floats to ``digits``."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, (int, np.integer)):
        return str(value)
    return f"{value:.{digits}g}"


def fit_text(fit: dict) -> str:
    """A fit as the claim table prints it: slope [CI], R², number of points."""
    slope, lo, hi = (format_number(fit[k]) for k in ("slope", "lo", "hi"))
    return f"{slope} [{lo}, {hi}], R²={format_number(fit['r2'], 2)}, n={fit['n']}"
