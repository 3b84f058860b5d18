"""The communication interface every algorithm is written against, and the shared local-update loop."""

from __future__ import annotations

from typing import Protocol

import torch

from distdpo.algorithms.optim import ClientOptimizer
from distdpo.tasks.base import Task


class Communicator(Protocol):
    """What an engine supplies. Rows are node parameters; an engine holds a block of them.

    The simulator holds all n rows in one tensor; a torch.distributed rank holds
    its own block and fills in what the others hold over the network.
    """

    num_nodes: int
    local_nodes: torch.Tensor  # global ids of the rows held here, ascending

    def aggregate(self, values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Σ_k weights_k · values_k over the participating rows of *every* engine part → ``[p]``."""

    def mix(self, values: torch.Tensor, round_index: int) -> torch.Tensor:
        """Gossip: rows of W_t @ X for the local rows (``values`` holds all local rows)."""

    def neighbourhood(self, round_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The nodes the local rows of W_t touch (global ids, ascending, the local ones included) and those rows of
        W_t over them: what :meth:`exchange` returns is mixed with it."""

    def exchange(self, values: torch.Tensor, round_index: int) -> torch.Tensor:
        """Gossip's transport without the mixing: the rows of every node in :meth:`neighbourhood`, given the local
        rows (any dtype: compressed payloads travel as bytes). ``mix`` is ``W_loc @ exchange(values)``."""

    def gather_rows(self, values: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
        """Every engine part's rows of ``nodes`` (sorted global ids), in that order; ``values`` holds the rows of
        the local ones. Compressed uploads travel so, since a sum of compressed payloads is not one."""


class Algorithm(Protocol):
    """What every algorithm (federated, decentralized, centralized, and the Flower server) offers an engine."""

    def global_params(self) -> torch.Tensor:
        """θ̄: the model the metrics evaluate (the server's model, or the nodes' mean)."""

    def run_round(self, round_index: int) -> dict[str, float]:
        """One communication round; returns its statistics (``bytes`` sent, drift, consensus distances)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything a resumed run needs to continue bit for bit."""

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""


def node_mean(comm: Communicator, X: torch.Tensor) -> torch.Tensor:
    """θ̄ = (1/n) Σ_i θ_i."""
    return comm.aggregate(X, torch.full((X.shape[0],), 1.0 / comm.num_nodes, dtype=X.dtype, device=X.device))


def consensus_distance(comm: Communicator, X: torch.Tensor) -> float:
    """Ξ = (1/n) Σ_i ‖θ_i − θ̄‖², in float64 and in two passes (no cancellation near consensus)."""
    X64 = X.to(torch.float64)
    mean = node_mean(comm, X64)
    return float(node_mean(comm, ((X64 - mean) ** 2).sum(1, keepdim=True))[0])


def local_steps(
    task: Task,
    X: torch.Tensor,
    nodes: torch.Tensor,
    steps: int,
    optimizer: ClientOptimizer,
    batch_fn,
    *,
    correction: torch.Tensor | None = None,
    prox_mu: float = 0.0,
    track_direction: bool = False,
    state: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """K local steps for all given rows at once.

    ``correction`` is added to every stochastic gradient (SCAFFOLD's c − c_i,
    gradient tracking's correction); ``prox_mu`` adds FedProx's μ(θ − θ_start).
    Returns the new rows, each row's drift (1/K) Σ_k ‖θ_k − θ_start‖², and, if
    asked, the mean update direction (1/K) Σ_k d_k. ``state``: the optimizer state to continue (updated in place;
    default a fresh one).
    """
    start = X
    state = optimizer.init_state(X) if state is None else state
    drift = torch.zeros(X.shape[0], dtype=torch.float64, device=X.device)
    direction = torch.zeros_like(X) if track_direction else None
    for _ in range(steps):
        batch = batch_fn()  # drawn even when this engine part holds no row: every part consumes the same numbers
        if not len(X):
            continue
        _, g = task.loss_and_grad(X, nodes, batch)
        if correction is not None:
            g = g + correction
        if prox_mu:
            g = g + prox_mu * (X - start)
        if direction is not None:
            direction += g
        X = optimizer.step(X, g, state)
        drift += ((X - start) ** 2).sum(1).to(torch.float64)
    if direction is not None:
        direction /= steps
    return X, drift / steps, direction
