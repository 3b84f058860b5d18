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
from distdpo.personalization import personalization_gap
from distdpo.topology import Topology

COLUMNS = [
    "run",
    "round",
    "algorithm",
    "global_loss",
    "grad_norm_sq",
    "optimality_gap",
    "consensus_distance",
    "consensus_distance_before_gossip",
    "consensus_distance_after_gossip",
    "client_drift",
    "lora_aggregation_error",
    "heterogeneity",
    "pref_accuracy",
    "pref_accuracy_worst",
    "true_pref_accuracy",
    "reward_margin",
    "eval_loss",
    "rewards/chosen",
    "rewards/rejected",
    "logratio_chosen",
    "worst_client_loss",
    "bytes_communicated",
    "clients_replied",
    "wall_time_s",
]


def evaluated(cfg: Config, round_index: int) -> bool:
    """Whether round ``round_index`` gets a metric row: every ``engine.eval_every`` rounds, and the last."""
    return round_index % cfg.engine.eval_every == 0 or round_index == cfg.algorithm.rounds


# A run stops as diverged when its loss leaves this multiple of its starting value (or stops being finite).
DIVERGENCE_FACTOR = 100.0


class RunDiverged(Exception):
    """Raised by :meth:`Recorder.record`: the run's finite rows so far and its summary (``status`` diverged)."""

    def __init__(self, rows: list[dict[str, Any]], summary: dict[str, Any]):
        super().__init__(summary.get("reason", "diverged"))
        self.rows, self.summary = rows, summary


class Recorder:
    """Turns (round, θ̄, algorithm stats) into metric rows and the run's summary entry."""

    def __init__(
        self, cfg: Config, label: str, task, weights: torch.Tensor, topology: Topology | None, optimum, extra_columns=()
    ):
        self.cfg, self.label, self.task, self.weights = cfg, label, task, weights
        self.topology, self.optimum = topology, optimum
        # No f★ (non-convex policy, or a loss with no certified minimum: see ``Solution.note``) → gap NaN.
        self.f_star = optimum.f_star if optimum is not None and optimum.f_star is not None else math.nan
        self.columns = COLUMNS + [c for c in extra_columns if c not in COLUMNS]
        self.rows: list[dict[str, Any]] = []
        self.total_bytes = 0

    def record(
        self, round_index: int, theta: torch.Tensor, stats: dict[str, float], wall_time_s: float
    ) -> dict[str, Any]:
        """Evaluate θ̄ and append the round's row (``stats['bytes']`` adds to the cumulative count)."""
        self.total_bytes += int(stats.get("bytes", 0))
        m = self.task.evaluate(theta, self.weights)
        row: dict[str, Any] = {c: math.nan for c in self.columns}
        row.update(m)
        row.update({k: v for k, v in stats.items() if k != "bytes"})
        row.update(
            run=self.label,
            round=round_index,
            algorithm=self.cfg.algorithm.name,
            bytes_communicated=self.total_bytes,
            wall_time_s=wall_time_s,
        )
        row["optimality_gap"] = m["global_loss"] - self.f_star
        reason = self._divergence(row, theta)
        if reason:
            raise RunDiverged(self.rows, self.diverged_summary(round_index, reason))
        self.rows.append(row)
        return row

    def _divergence(self, row: dict[str, Any], theta: torch.Tensor) -> str | None:
        """Why this row shows a diverged run (non-finite values, or a loss DIVERGENCE_FACTOR × its start), else None."""
        loss = row["global_loss"]
        if not math.isfinite(loss):
            return f"the global loss is {loss}"
        if not bool(torch.isfinite(theta).all()):
            return "the parameters are no longer finite"
        if self.rows:
            start = self.rows[0]["global_loss"]
            if abs(loss) > DIVERGENCE_FACTOR * max(abs(start), 1e-3):
                return f"the global loss {loss:.4g} exceeds {DIVERGENCE_FACTOR:g} × its start ({start:.4g})"
        return None

    def diverged_summary(self, round_index: int, reason: str) -> dict[str, Any]:
        """A diverged run's summary: where and why it stopped, and the last finite row's values."""
        last = self.rows[-1] if self.rows else {}
        return {
            "status": "diverged",
            "diverged_at_round": round_index,
            "reason": f"{reason} at round {round_index}; lower algorithm.lr",
            "algorithm": self.cfg.algorithm.name,
            "engine": self.cfg.engine.name,
            "final": {k: last[k] for k in self.columns if k in last and k not in ("run", "algorithm")},
            "last_finite_round": last.get("round"),
            "num_clients": self.task.num_clients,
            "num_params": self.task.num_params,
        }

    def skip(self, stats: dict[str, float]) -> None:
        """A round that is not evaluated (``engine.eval_every``) still counts its bytes."""
        self.total_bytes += int(stats.get("bytes", 0))

    def summary(self, final_theta: torch.Tensor) -> dict[str, Any]:
        """Final values plus f★, ζ² and σ² (at θ★ when convex, else at the final model), spectral gap."""
        final = self.rows[-1]
        out: dict[str, Any] = {
            "status": "ok",
            "algorithm": self.cfg.algorithm.name,
            "engine": self.cfg.engine.name,
            "final": {k: final[k] for k in self.columns if k not in ("run", "algorithm")},
            "f_star": None if math.isnan(self.f_star) else self.f_star,
            "num_clients": self.task.num_clients,
            "num_params": self.task.num_params,
            "aggregation": build.aggregation(self.cfg),
        }
        star = self.optimum is not None and self.optimum.theta is not None
        if star:
            at = self.optimum.theta
            out["heterogeneity"] = float(self.task.evaluate(at, self.weights)["heterogeneity"])
        else:  # the last row was evaluated at the final model already: no second (LM: costly) evaluation
            at = final_theta
            out["heterogeneity"] = float(final["heterogeneity"])
        out["grad_noise"] = self.task.grad_noise(at)
        out["measured_at"] = "theta_star" if star else "final_model"
        bs = build.batch_size(self.cfg)
        out["grad_noise_batch"] = 0.0 if bs is None else out["grad_noise"] / bs
        if self.optimum is not None:
            out["solver"] = self.optimum.describe()  # method, converged, certificate (and a note)
            if self.optimum.note:
                out["f_star_note"] = self.optimum.note  # why there is no f★, or why it is approximate
        gap = personalization_gap(self.task, final_theta)
        if gap is not None:
            out["personalization_gap"] = gap  # each client's own optimum vs the shared model, held out
        ranks = build.client_lora_ranks(self.cfg, self.task)
        if ranks is not None:
            out["lora_ranks"] = dict(zip(map(str, self.task.client_names), ranks))
        if self.task.data_stats:
            out["data_stats"] = self.task.data_stats  # dropped / skipped / truncated counts of text data
        if self.topology is not None:
            out["topology"] = self.topology.describe()
            out["spectral_gap"] = out["topology"]["spectral_gap"]
        return out
