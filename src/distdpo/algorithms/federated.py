"""Federated DPO: FedAvg with local steps and client sampling, FedProx, SCAFFOLD, server optimizers.

One class covers the family: the variants differ only in the correction added
to local gradients (FedProx's proximal term, SCAFFOLD's control variates) and
in the server optimizer applied to the aggregated update.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from distdpo.algorithms.base import Communicator, local_steps
from distdpo.algorithms.compression import Uplink
from distdpo.algorithms.lora import RankMasks, aggregate_lora
from distdpo.algorithms.optim import ClientOptimizer, ServerOptimizer
from distdpo.tasks.base import Task


def sample_clients(generator: torch.Generator, num_clients: int, clients_per_round: int) -> torch.Tensor:
    """S distinct clients, uniformly, sorted (the same on every engine part)."""
    if clients_per_round >= num_clients:
        return torch.arange(num_clients)
    return torch.randperm(num_clients, generator=generator)[:clients_per_round].sort().values


def federated_round_bytes(num_params: list[int], itemsize: int, scaffold: bool, upload: int | None = None) -> int:
    """Bytes one federated round sends: the model down and the update up (``upload`` bytes if compressed) per
    sampled client, who holds ``num_params[i]`` parameters; SCAFFOLD adds one vector down (c, or c − c_i) and none
    up, since c_i's change (θ − θ_i,K)/(Kη) − c follows from what came up."""
    dense = sum(num_params) * itemsize
    return (2 if scaffold else 1) * dense + (dense if upload is None else len(num_params) * upload)


def scaffold_controls(
    c: torch.Tensor, c_local: torch.Tensor, start: torch.Tensor, end: torch.Tensor, local_steps: int, lr: float
) -> torch.Tensor:
    """SCAFFOLD's new client control variates (Karimireddy et al., Option II): c_i⁺ = c_i − c + (θ_start − θ_K)/(Kη)."""
    return c_local - c + (start - end) / (local_steps * lr)


class Federated:
    """FedAvg-DPO and its relatives on the rows ``comm`` holds.

    Each round: sample S clients; each starts from the global model (or, with
    staleness q_max > 0, from the global model of a uniformly drawn q ≤ q_max
    rounds ago), runs K local steps, and sends Δ_i = θ_i,K − θ_i,0; the server
    averages the Δ_i (weights p_i ∝ |D_i| or uniform, renormalized over S) and
    applies the average with its optimizer. With an ``uplink`` the Δ_i travel compressed (with the sender's
    error feedback, :class:`~distdpo.algorithms.compression.Uplink`). A task with LoRA (``task.lora_layout()``)
    aggregates its adapters as ``lora_aggregation`` says (:mod:`distdpo.algorithms.lora`). With ``rank_masks``
    (clients of different LoRA ranks) client i starts from θ ⊙ m_i and keeps its steps inside m_i, so it holds, trains
    and sends only its rank's entries; a component it lacks is left as the server has it.
    """

    kind = "federated"

    def __init__(
        self,
        task: Task,
        comm: Communicator,
        *,
        weights: torch.Tensor,
        local_steps: int,
        optimizer: ClientOptimizer,
        server: ServerOptimizer,
        clients_per_round: int,
        batch_size: int | None,
        staleness: int = 0,
        prox_mu: float = 0.0,
        scaffold: bool = False,
        uplink: Uplink | None = None,
        keep_optimizer_state: bool = False,
        lora_aggregation: str = "factors",
        rank_masks: RankMasks | None = None,
        measured: Callable[[int], bool] | None = None,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ):
        self.task, self.comm = task, comm
        self.weights = weights.to(dtype)
        self.K, self.optimizer, self.server = local_steps, optimizer, server
        self.S, self.batch_size, self.staleness = clients_per_round, batch_size, staleness
        self.prox_mu, self.scaffold = prox_mu, scaffold
        self.data_gen = torch.Generator().manual_seed(seed + 1)
        self.sample_gen = torch.Generator().manual_seed(seed + 2)
        self.theta = task.initial_params().to(dtype)
        self.history = [self.theta]  # the last q_max + 1 global models, newest last
        if scaffold:
            self.c = torch.zeros_like(self.theta)
            self.c_local = torch.zeros(len(comm.local_nodes), self.theta.numel(), dtype=dtype, device=self.theta.device)
        self.itemsize = self.theta.element_size()
        self.uplink = uplink
        layout = getattr(task, "lora_layout", None)
        self.lora = layout() if callable(layout) else None
        self.lora_mode = lora_aggregation
        self.masks = None if rank_masks is None else rank_masks.to(self.theta)
        # Which rounds (1-based) get a metric row: only they need lora_aggregation_error (None: every round).
        self.measured = measured or (lambda r: True)
        local = self.theta.expand(len(comm.local_nodes), -1)
        self.opt_state = optimizer.init_state(local, per_row=True) if keep_optimizer_state else None

    def global_params(self) -> torch.Tensor:
        return self.theta

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a resumed run needs to continue bit for bit (SCAFFOLD's c_i: this engine part's rows only)."""
        state = {
            "theta": self.theta,
            "history": torch.stack(self.history),
            "rng.data": self.data_gen.get_state(),
            "rng.sample": self.sample_gen.get_state(),
        }
        state.update({f"server.{k}": v for k, v in self.server.state.items()})
        if self.scaffold:
            state.update(c=self.c, c_local=self.c_local)
        if self.uplink is not None:
            state.update(self.uplink.state_dict())
        if self.opt_state is not None:
            state.update({f"opt.{k}": v for k, v in self.opt_state.items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        like = self.theta
        self.theta = state["theta"].to(like)
        self.history = list(state["history"].to(like).unbind(0))
        self.data_gen.set_state(state["rng.data"])
        self.sample_gen.set_state(state["rng.sample"])
        self.server.state = {k[len("server.") :]: v.to(like) for k, v in state.items() if k.startswith("server.")}
        if self.scaffold:
            self.c, self.c_local = state["c"].to(like), state["c_local"].to(like)
        if self.uplink is not None:
            self.uplink.load_state_dict(state)
        if self.opt_state is not None:
            self.opt_state = {k: state[f"opt.{k}"].to(like) for k in self.opt_state}

    def run_round(self, round_index: int) -> dict[str, float]:
        sampled = sample_clients(self.sample_gen, self.comm.num_nodes, self.S)
        # Delays are drawn for every sampled client so every engine part consumes the same numbers.
        max_delay = min(self.staleness, len(self.history) - 1)
        delays = torch.randint(0, max_delay + 1, (len(sampled),), generator=self.sample_gen) if max_delay else None
        is_local = torch.isin(sampled, self.comm.local_nodes)
        nodes = sampled[is_local]
        rows = torch.searchsorted(self.comm.local_nodes, nodes)
        if delays is None:
            start = self.theta.expand(len(nodes), -1)
        else:
            start = (
                torch.stack([self.history[-1 - int(q)] for q in delays[is_local]])
                if len(nodes)
                else self.theta[None, :0]
            )
        correction = (self.c - self.c_local[rows]) if self.scaffold else None
        mask = None if self.masks is None else self.masks[nodes]
        if mask is not None:
            start = start * mask
            correction = None if correction is None else correction * mask
        opt_state = None if self.opt_state is None else {k: v[rows] for k, v in self.opt_state.items()}
        X, drift, _ = local_steps(
            self.task,
            start,
            nodes.to(self.theta.device),
            self.K,
            self.optimizer,
            lambda: self.task.sample_batch(self.data_gen, self.batch_size),
            correction=correction,
            prox_mu=self.prox_mu,
            state=opt_state,
        )
        if opt_state is not None:
            for k, v in opt_state.items():
                self.opt_state[k][rows] = v
        if mask is not None:  # (a no-op for SGD: both factors of a missing component are 0, so is its gradient)
            X = X * mask
        delta = X - start
        p = self.weights[sampled]
        sent = None  # every sampled client's update, where this engine part has them
        if self.uplink is None:
            update = self.comm.aggregate(delta, (p / p.sum())[is_local])
        else:  # every engine part receives every sampled client's payload and sums the decoded updates alike
            sent = self.uplink.send(delta, nodes, rows, sampled)
            update = (p / p.sum()).to(delta) @ sent
        n_s = len(sampled)
        stats = {"client_drift": float(self.comm.aggregate(drift[:, None], torch.full_like(drift, 1 / n_s))[0])}
        # The factors of θ + Δ_i (each client's end when it started from θ): "product" aggregates them; the other
        # modes only report their error, on rounds that are recorded (it gathers every client's update).
        if self.lora and (self.lora_mode == "product" or self.measured(round_index + 1)):
            sent = self.comm.gather_rows(delta, sampled) if sent is None else sent
            merged, stats["lora_aggregation_error"] = aggregate_lora(
                self.theta + sent, p / p.sum(), self.lora, self.lora_mode
            )
            if self.lora_mode == "product":
                update = merged - self.theta
        if self.scaffold:
            # c tracks Σ p_i c_i
            new_c = scaffold_controls(self.c, self.c_local[rows], start, X, self.K, self.optimizer.lr)
            dc = self.comm.aggregate(new_c - self.c_local[rows], self.weights[nodes] / self.weights.sum())
            self.c_local[rows] = new_c
            self.c = self.c + dc
        self.theta = self.server.step(self.theta, update)
        self.history = (self.history + [self.theta])[-(self.staleness + 1) :]
        upload = None if self.uplink is None else self.uplink.q.nbytes
        held = [self.theta.numel()] * n_s if self.masks is None else self.masks.held(sampled)
        stats["bytes"] = federated_round_bytes(held, self.itemsize, self.scaffold, upload)
        return stats
