"""What an algorithm needs from a workload: stacked losses and gradients.

A task owns the clients' data, the policy and the loss. Algorithms only ever
call the methods of :class:`Task`, so the same algorithm code trains the
synthetic log-linear model and a language model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class Batch:
    """Pair indices for every client (``[n, B]``) and each pair's weight in its client's loss."""

    index: torch.Tensor  # [n, B] long
    scale: torch.Tensor  # [n, B]; client loss = Σ_b scale · loss_b

    def rows(self, nodes: torch.Tensor) -> "Batch":
        return Batch(self.index[nodes], self.scale[nodes])


def client_metrics(losses: torch.Tensor, grads: torch.Tensor, weights: torch.Tensor) -> dict[str, float]:
    """f = Σ p_i f_i, ‖∇f‖², ζ² = (1/n) Σ ‖∇f_i − ∇f‖² and the worst f_i, from every client's loss and gradient."""
    w = weights.to(torch.float64)
    full = w @ grads
    return {
        "global_loss": float(w @ losses),
        "grad_norm_sq": float(full @ full),
        "heterogeneity": float(((grads - full) ** 2).sum(1).mean()),
        "worst_client_loss": float(losses.max()),
    }


class Task(Protocol):
    """What training needs: the algorithms call nothing else."""

    num_clients: int
    num_params: int
    client_sizes: torch.Tensor  # [n] long

    def initial_params(self) -> torch.Tensor:
        """The starting parameter vector ``[p]`` (the reference policy's)."""

    def sample_batch(self, generator: torch.Generator, batch_size: int | None) -> Batch:
        """A minibatch for *all* n clients (``None`` = full batch), so every engine draws the same numbers."""

    def loss_and_grad(self, X: torch.Tensor, nodes: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row loss ``[m]`` and gradient ``[m, p]`` of row k under client ``nodes[k]``'s batch."""

    def pooled(self, weights: torch.Tensor) -> "Task":
        """All clients' data as one client, each pair weighted so that its loss is Σ weights_i f_i."""


class MeasuredTask(Task, Protocol):
    """What measurement needs: the recorder, the warnings, checkpoints and the theory's data-driven estimates."""

    convex: bool  # f★ exists and the convex theory applies (log-linear policy)
    device: torch.device
    client_names: list[str]
    data_stats: dict  # what loading the data dropped, skipped or truncated ({} for generated data)

    def evaluate(self, theta: torch.Tensor, weights: torch.Tensor) -> dict[str, float]:
        """Metrics of one model (global loss f = Σ weights_i f_i, held-out accuracies, …)."""

    def held_out_sizes(self) -> list[int]:
        """Held-out pairs per client."""

    def full_gradient(self, theta: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """∇f(θ), the gradient that :meth:`evaluate` reports."""

    def grad_noise(self, theta: torch.Tensor) -> float:
        """σ²: the variance of a one-pair stochastic gradient."""

    def fingerprint(self) -> dict[str, str]:
        """``{"data": …, "model": …}`` hashes of what the task trains on (see :mod:`distdpo.fingerprint`)."""


class ConvexTask(MeasuredTask, Protocol):
    """What the convex theory and the exact solvers need (the log-linear policy)."""

    beta: float
    loss_type: str
    label_smoothing: float

    def objective(self, theta: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """f(θ) in float64, differentiable."""

    def margin_features(self, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(A, b, w)``: margins h = Aθ − b and f(θ) = Σ_k w_k ℓ(h_k)."""
