"""Decentralized DPO: DSGD (adapt-then-combine or combine-then-adapt), gradient tracking and CHOCO-SGD.

Peers hold their own parameters and only gossip with graph neighbours
(``comm.mix`` = rows of W_t @ X); K local steps may run between gossips.
"""

from __future__ import annotations

import torch

from distdpo.algorithms.base import Communicator, consensus_distance, local_steps, node_mean
from distdpo.algorithms.gossip import CompressedGossip
from distdpo.algorithms.optim import ClientOptimizer
from distdpo.tasks.base import Task
from distdpo.topology import Topology


class Decentralized:
    """DSGD and gradient tracking on the rows ``comm`` holds.

    * ``dsgd`` + ``atc``: X ← W (X after K local steps);
      ``dsgd`` + ``cta``: X ← W X, then K local steps.
    * ``gradient_tracking`` (adapt-then-combine, DIGing/NEXT-style, with K-GT's
      local steps): each node i keeps a correction C_i (Σ_i C_i = 0) and runs
      K steps along g_i + C_i; with D_i their mean direction, it gossips
      X ← W Z and C ← C + W D − D. For K = 1 the tracker y = g + C obeys
      y⁺ = W y + g(X⁺) − g(X), the gradient-tracking recursion, so the
      heterogeneity floor of DSGD disappears.
    * ``compressed`` (DSGD with ``algorithm.compression``, and CHOCO-SGD): gossip through
      :class:`~distdpo.algorithms.gossip.CompressedGossip` instead of ``comm.mix``.
    * ``keep_optimizer_state``: each node's optimizer state persists across rounds instead of restarting.
    """

    kind = "decentralized"

    def __init__(
        self,
        task: Task,
        comm: Communicator,
        topology: Topology,
        *,
        local_steps: int,
        optimizer: ClientOptimizer,
        batch_size: int | None,
        tracking: bool = False,
        gossip: str = "atc",
        compressed: CompressedGossip | None = None,
        keep_optimizer_state: bool = False,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ):
        self.task, self.comm, self.topology = task, comm, topology
        self.K, self.optimizer, self.batch_size = local_steps, optimizer, batch_size
        self.tracking, self.gossip = tracking, gossip
        self.data_gen = torch.Generator().manual_seed(seed + 1)
        theta0 = task.initial_params().to(dtype)
        self.X = theta0.expand(len(comm.local_nodes), -1).clone()
        self.nodes = comm.local_nodes.to(self.X.device)
        if tracking:
            self.correction = torch.zeros_like(self.X)
        self.itemsize = self.X.element_size()
        self.compressed = compressed
        self.opt_state = optimizer.init_state(self.X, per_row=True) if keep_optimizer_state else None

    def global_params(self) -> torch.Tensor:
        return node_mean(self.comm, self.X)

    def node_params(self) -> torch.Tensor:
        """Every node's own parameters ``[n, p]``, on every engine part: one aggregate whose weight matrix puts
        each local row in its node's place (a collective under torch.distributed)."""
        place = torch.arange(self.comm.num_nodes, device=self.X.device)[:, None] == self.nodes[None, :]
        return self.comm.aggregate(self.X, place.to(self.X.dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a resumed run needs to continue bit for bit (this engine part's rows only)."""
        state = {"X": self.X, "rng.data": self.data_gen.get_state()}
        if self.tracking:
            state["correction"] = self.correction
        if self.compressed is not None:
            state.update(self.compressed.state_dict())
        if self.opt_state is not None:
            state.update({f"opt.{k}": v for k, v in self.opt_state.items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state["X"].shape != self.X.shape:
            raise ValueError(
                f"checkpoint holds {state['X'].shape[0]} node rows, this engine part holds {self.X.shape[0]}"
            )
        self.X = state["X"].to(self.X)
        self.data_gen.set_state(state["rng.data"])
        if self.tracking:
            self.correction = state["correction"].to(self.X)
        if self.compressed is not None:
            self.compressed.load_state_dict(state)
        if self.opt_state is not None:
            self.opt_state = {k: state[f"opt.{k}"].to(self.X) for k in self.opt_state}

    def _local(self, X: torch.Tensor):
        return local_steps(
            self.task,
            X,
            self.nodes,
            self.K,
            self.optimizer,
            lambda: self.task.sample_batch(self.data_gen, self.batch_size),
            correction=self.correction if self.tracking else None,
            track_direction=self.tracking,
            state=self.opt_state,
        )

    def _mix(self, X: torch.Tensor, round_index: int) -> torch.Tensor:
        return self.compressed.mix(X, round_index) if self.compressed else self.comm.mix(X, round_index)

    def run_round(self, round_index: int) -> dict[str, float]:
        stats: dict[str, float] = {}
        if self.gossip == "cta" and not self.tracking:
            stats["consensus_distance_before_gossip"] = consensus_distance(self.comm, self.X)
            self.X = self._mix(self.X, round_index)
            stats["consensus_distance_after_gossip"] = consensus_distance(self.comm, self.X)
            self.X, drift, _ = self._local(self.X)
        else:
            Z, drift, D = self._local(self.X)
            stats["consensus_distance_before_gossip"] = consensus_distance(self.comm, Z)
            if self.tracking:
                p = Z.shape[1]
                mixed = self.comm.mix(torch.cat([Z, D], dim=1), round_index)  # one message: params + tracker
                self.X = mixed[:, :p]
                self.correction = self.correction + mixed[:, p:] - D
            else:
                self.X = self._mix(Z, round_index)
            stats["consensus_distance_after_gossip"] = consensus_distance(self.comm, self.X)
        cta = self.gossip == "cta" and not self.tracking
        stats["consensus_distance"] = (
            consensus_distance(self.comm, self.X) if cta else stats["consensus_distance_after_gossip"]
        )
        n = self.comm.num_nodes
        stats["client_drift"] = float(self.comm.aggregate(drift[:, None], torch.full_like(drift, 1 / n))[0])
        if self.compressed is not None:
            stats["bytes"] = self.compressed.round_bytes(round_index)
        else:
            per_message = self.X.shape[1] * self.itemsize * (2 if self.tracking else 1)
            stats["bytes"] = self.topology.messages_per_round(round_index) * per_message
        return stats
