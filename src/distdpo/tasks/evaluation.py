"""Evaluation where the data is: each site reports sums and counts for its clients, one function combines them.

A language-model task's metrics (the global loss Σ p_i f_i, ‖∇f‖², ζ², held-out accuracies and margins) are all
functions of per-client quantities. A site computes :class:`ClientReport` for the clients it holds; the
simulator, a torch.distributed all-gather or a Flower server collects them and :func:`combine` turns every
client's report into the metric row — the same function wherever the reports were made, so every engine's
``metrics.csv`` means the same thing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from distdpo.fingerprint import digest
from distdpo.tasks.base import client_metrics

# Held-out sums a report carries (each divided by the number of held-out pairs when combined).
HELD_OUT_SUMS = ("eval_loss", "reward_margin", "rewards/chosen", "rewards/rejected", "logratio_chosen")


@dataclass
class ClientReport:
    """One client's loss and gradient on its fixed loss pairs, its held-out sums and counts, its timing."""

    client: int  # the client's index in the run
    loss: float
    grad: torch.Tensor  # [p] float64
    held_out: int = 0  # held-out pairs
    correct: float = 0.0  # held-out pairs whose implicit reward prefers the chosen completion
    sums: dict[str, float] = field(default_factory=dict)  # HELD_OUT_SUMS over the held-out pairs
    tokens: int = 0  # training tokens since the last evaluation, and the seconds they took
    seconds: float = 0.0


def combine(reports: list[ClientReport], weights: torch.Tensor, names: list[str]) -> dict[str, float]:
    """The metric row of every client's report (one per client, any order)."""
    by_client = sorted(reports, key=lambda r: r.client)
    if [r.client for r in by_client] != list(range(len(names))):
        missing = sorted(set(range(len(names))) - {r.client for r in reports})
        raise ValueError(f"evaluation lacks the reports of clients {[names[i] for i in missing]}")
    losses = torch.tensor([r.loss for r in by_client], dtype=torch.float64)
    grads = torch.stack([r.grad.to(torch.float64).cpu() for r in by_client])
    seconds = sum(r.seconds for r in by_client)
    out = {
        **client_metrics(losses, grads, weights),
        "tokens_per_second": sum(r.tokens for r in by_client) / seconds if seconds else float("nan"),
    }
    out.update({f"client_loss/{name}": float(loss) for name, loss in zip(names, losses.tolist())})
    evaluated = [r for r in by_client if r.held_out]
    if evaluated:
        pairs = sum(r.held_out for r in evaluated)
        accuracy = [r.correct / r.held_out for r in evaluated]
        out.update({key: sum(r.sums[key] for r in evaluated) / pairs for key in HELD_OUT_SUMS})
        out["pref_accuracy"] = sum(accuracy) / len(accuracy)  # the mean client's accuracy
        out["pref_accuracy_worst"] = min(accuracy)
    return out


def gradient(reports: list[ClientReport], weights: torch.Tensor) -> torch.Tensor:
    """∇f = Σ_i p_i ∇f_i from every client's report."""
    grads = torch.stack([r.grad.to(torch.float64).cpu() for r in sorted(reports, key=lambda r: r.client)])
    return weights.to(torch.float64) @ grads


def mean_grad_noise(values) -> float:
    """σ²: the mean of the clients' one-pair gradient variances (None: a client with fewer than 2 pairs)."""
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


class FederatedTask:
    """A task whose clients' data is spread over processes (one per site or rank), measured where the data is.

    Training calls pass through to this process's task (which holds only its clients' pairs). Measurement is a
    collective: ``gather(obj)`` returns every process's ``obj`` in process order, and every process must call
    :meth:`evaluate`, :meth:`full_gradient` and :meth:`grad_noise` together. The data counts and the data
    fingerprint are gathered once, here.
    """

    def __init__(self, task, gather: Callable[[Any], list]):
        self.task, self.gather = task, gather
        counts: dict[str, int] = {}
        for stats in gather(task.data_stats):
            for key, value in stats.items():
                if isinstance(value, (int, float)):
                    counts[key] = counts.get(key, 0) + value
        self.data_stats = counts
        parts = gather(task.fingerprint())
        self._fingerprint = {"data": digest([], *(part["data"] for part in parts)), "model": parts[0]["model"]}

    def __getattr__(self, name: str):
        return getattr(self.task, name)

    def fingerprint(self) -> dict[str, str]:
        return dict(self._fingerprint)

    def _reports(self, theta: torch.Tensor) -> list[ClientReport]:
        return [report for part in self.gather(self.task.client_reports(theta)) for report in part]

    def evaluate(self, theta: torch.Tensor, weights: torch.Tensor) -> dict[str, float]:
        return combine(self._reports(theta), weights, self.task.client_names)

    def full_gradient(self, theta: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return gradient(self._reports(theta), weights)

    def grad_noise(self, theta: torch.Tensor) -> float:
        return mean_grad_noise(v for part in self.gather(self.task.client_grad_noise(theta)) for v in part.values())


__all__ = ["HELD_OUT_SUMS", "ClientReport", "FederatedTask", "combine", "gradient", "mean_grad_noise"]
