"""Per-round metric rows and the per-run summary, shared by every engine.

An engine calls :meth:`Recorder.record` with the model to evaluate (θ̄) and the
round's statistics from the algorithm, and :meth:`Recorder.summary` at the end.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from distdpo import build
from distdpo.config import Config
from distdpo.topology import Topology

COLUMNS = [
    "run", "round", "algorithm", "global_loss", "grad_norm_sq", "optimality_gap",
    "consensus_distance", "consensus_distance_before_gossip", "consensus_distance_after_gossip",
    "client_drift", "heterogeneity", "pref_accuracy", "pref_accuracy_worst", "true_pref_accuracy",
    "reward_margin", "eval_loss", "rewards/chosen", "rewards/rejected", "logratio_chosen",
    "worst_client_loss", "bytes_communicated", "wall_time_s",
]


def evaluated(cfg: Config, round_index: int) -> bool:
    """Whether round ``round_index`` gets a metric row: every ``engine.eval_every`` rounds, and the last."""
    return round_index % cfg.engine.eval_every == 0 or round_index == cfg.algorithm.rounds


class Recorder:
    """Turns (round, θ̄, algorithm stats) into metric rows and the run's summary entry."""

    def __init__(self, cfg: Config, label: str, task, weights: torch.Tensor, topology: Topology | None, optimum, extra_columns=()):
        self.cfg, self.label, self.task, self.weights = cfg, label, task, weights
        self.topology, self.optimum = topology, optimum
        self.f_star = optimum.f_star if optimum is not None else math.nan
        self.columns = COLUMNS + [c for c in extra_columns if c not in COLUMNS]
        self.rows: list[dict[str, Any]] = []
        self.total_bytes = 0

    def record(self, round_index: int, theta: torch.Tensor, stats: dict[str, float], wall_time_s: float) -> dict[str, Any]:
        """Evaluate θ̄ and append the round's row (``stats['bytes']`` adds to the cumulative count)."""
        self.total_bytes += int(stats.get("bytes", 0))
        m = self.task.evaluate(theta, self.weights)
        row: dict[str, Any] = {c: math.nan for c in self.columns}
        row.update(m)
        row.update({k: v for k, v in stats.items() if k != "bytes"})
        row.update(run=self.label, round=round_index, algorithm=self.cfg.algorithm.name,
                   bytes_communicated=self.total_bytes, wall_time_s=wall_time_s)
        row["optimality_gap"] = m["global_loss"] - self.f_star
        self.rows.append(row)
        if not math.isfinite(row["global_loss"]):
            raise FloatingPointError(
                f"run {self.label!r} diverged at round {round_index} (global loss {row['global_loss']}); lower algorithm.lr"
            )
        return row

    def skip(self, stats: dict[str, float]) -> None:
        """A round that is not evaluated (``engine.eval_every``) still counts its bytes."""
        self.total_bytes += int(stats.get("bytes", 0))

    def summary(self, final_theta: torch.Tensor) -> dict[str, Any]:
        """Final values plus f★, ζ² and σ² (at θ★ when convex, else at the final model), spectral gap."""
        final = self.rows[-1]
        out: dict[str, Any] = {
            "algorithm": self.cfg.algorithm.name,
            "engine": self.cfg.engine.name,
            "final": {k: final[k] for k in self.columns if k not in ("run", "algorithm")},
            "f_star": self.optimum.f_star if self.optimum is not None else None,
            "num_clients": self.task.num_clients,
            "num_params": self.task.num_params,
            "aggregation": build.aggregation(self.cfg),
        }
        if self.optimum is not None:
            at = self.optimum.theta
            out["heterogeneity"] = float(self.task.evaluate(at, self.weights)["heterogeneity"])
        else:  # the last row was evaluated at the final model already: no second (LM: costly) evaluation
            at = final_theta
            out["heterogeneity"] = float(final["heterogeneity"])
        out["grad_noise"] = self.task.grad_noise(at)
        out["measured_at"] = "theta_star" if self.optimum is not None else "final_model"
        bs = build.batch_size(self.cfg)
        out["grad_noise_batch"] = 0.0 if bs is None else out["grad_noise"] / bs
        if self.optimum is not None:
            out["solver"] = {"grad_norm": self.optimum.grad_norm, "iterations": self.optimum.iterations,
                             "converged": self.optimum.converged}
        if getattr(self.task, "data_stats", None):
            out["data_stats"] = self.task.data_stats  # dropped / skipped / truncated counts of text data
        if self.topology is not None:
            out["topology"] = self.topology.describe()
            out["spectral_gap"] = out["topology"]["spectral_gap"]
        return out
