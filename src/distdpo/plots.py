"""PNG plots of a run directory's metrics: one figure per metric, one line per run."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from distdpo.io import save_figure_atomic  # noqa: E402

# file name → (column, axis label, log scale)
PLOTS = {
    "loss.png": ("global_loss", "global loss f(θ̄)", False),
    "grad_norm_sq.png": ("grad_norm_sq", "‖∇f(θ̄)‖²", True),
    "optimality_gap.png": ("optimality_gap", "f(θ̄) − f★", True),
    "consensus_distance.png": ("consensus_distance", "consensus distance (1/n)Σ‖θᵢ − θ̄‖²", True),
    "pref_accuracy.png": ("pref_accuracy", "held-out preference accuracy", False),
}


def _series(rows: list[dict], column: str) -> dict[str, tuple[list, list]]:
    out: dict[str, tuple[list, list]] = {}
    for r in rows:
        v = r.get(column)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        xs, ys = out.setdefault(r["run"], ([], []))
        xs.append(r["round"])
        ys.append(v)
    return out


def plot_run_directory(rows: list[dict], out_dir: str | Path) -> list[Path]:
    """Write the standard plots for ``rows`` into ``out_dir``; metrics no run has are skipped."""
    written = []
    for name, (column, label, log) in PLOTS.items():
        series = _series(rows, column)
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for run, (xs, ys) in series.items():
            if log:
                ys = [max(y, 1e-16) for y in ys]  # a log axis cannot show 0 (exact consensus / optimum)
            ax.plot(xs, ys, label=run, linewidth=1.6)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        path = Path(out_dir) / name
        save_figure_atomic(fig, path)
        plt.close(fig)
        written.append(path)
    return written
