"""Figures of the report: a figure rendered to PNG, curves with a min–max band over seeds, log-log scatter fits."""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable

import numpy as np

from distdpo.report import Figure

LOG_FLOOR = 1e-16  # values drawn on a log axis are clipped here (a run at the optimum reaches exactly 0)


def render_figure(
    name: str, caption: str, draw: Callable, ncols: int = 1, width: float = 6.4, height: float = 4.2
) -> Figure:
    """Call ``draw(fig, axes)`` on a row of ``ncols`` panels and keep the result as a PNG figure of the report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols if ncols > 1 else width, height), squeeze=False)
    draw(fig, list(axes[0]))
    for ax in axes[0]:
        if ax.get_xscale() == "log":  # minor tick labels of a short log axis overlap
            ax.xaxis.set_minor_formatter(NullFormatter())
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return Figure(name, caption, buffer.getvalue())


def band_panel(
    ax,
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    log: bool,
    xlabel: str = "round",
    log_x: bool = False,
    marker: str | None = None,
    ylabel: str | None = None,
    title: str | None = None,
    legend: bool = False,
) -> None:
    """Draw each curve ``label → (x, values)`` as its mean over seeds with a min–max band (and label the panel).

    ``values`` holds one row per seed and one column per x (NaN where a seed has no value); the band is drawn
    wherever more than one seed has a value.
    """
    for label, (x, values) in curves.items():
        values = np.atleast_2d(np.asarray(values, float))
        if not values.size:
            continue
        if log:
            values = np.maximum(values, LOG_FLOOR)
        with warnings.catch_warnings():  # a column no seed has a value in (a metric not evaluated) stays NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            mean, low, high = np.nanmean(values, 0), np.nanmin(values, 0), np.nanmax(values, 0)
        (line,) = ax.plot(x, mean, label=label, linewidth=1.5, marker=marker)
        if (np.isfinite(values).sum(0) > 1).any():
            ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    if log:
        ax.set_yscale("log")
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.grid(True, alpha=0.3, which="both" if log_x else "major")
    if ylabel is not None:
        ax.set_ylabel(ylabel)
    if legend:
        ax.legend(fontsize=7)
    if title is not None:
        ax.set_title(title, fontsize=8)


def scatter_fit(ax, x, y, fit: dict, label: str, xlabel: str, ylabel: str, color=None) -> None:
    """Log-log scatter of the points a fit can use, with the fitted line and the theory's exponent in the legend."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = (x > 0) & (y > 0)  # what a log-log fit can use; the caption says what is left out
    if not keep.any():
        ax.text(0.5, 0.5, "no positive points to fit", transform=ax.transAxes, ha="center")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        return
    points = ax.scatter(x[keep], y[keep], label=label, s=18, color=color, alpha=0.8)
    if math.isfinite(fit.get("slope", math.nan)):
        usable = keep & np.isfinite(x) & np.isfinite(y)
        line_x = np.geomspace(x[usable].min(), x[usable].max(), 50)
        ax.plot(
            line_x,
            np.exp(fit["intercept"]) * line_x ** fit["slope"],
            color=points.get_facecolor()[0],
            linewidth=1,
            label=f"fit slope {fit['slope']:.2f} (theory {fit['predicted']:g})",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    levels = np.unique(x[keep])
    if len(levels) <= 8 and levels.max() / levels.min() < 100:  # a narrow log axis may show no tick: label the levels
        ax.set_xticks(levels, [f"{v:.3g}" for v in levels])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=7)
