"""Gossip with compressed messages: DSGD's and CHOCO-SGD's.

Each node i has a public copy x̂_i that every neighbour holds too (all start at the common θ₀). Per round node
i sends its neighbours one compressed message q_i and everyone decodes it the same way:

* with memory (CHOCO-SGD, Koloskova et al. 2019; DSGD with error feedback): q_i = Q(x_i − x̂_i), x̂_i ← x̂_i + q_i.
  (x_i − x̂_i is the error-feedback residual: this is error feedback on the rows' increments.)
* without (DSGD): q_i = Q(x_i) and x̂_i = q_i, afresh each round.

Then CHOCO takes the consensus step x_i ← x_i + γ Σ_j w_ij (x̂_j − x̂_i) (``consensus_lr`` γ), and DSGD mixes its
own row with its neighbours' copies, x_i ← w_ii x_i + Σ_{j≠i} w_ij x̂_j. With Q the identity and γ = 1 both are
DSGD's X ← W X.
"""

from __future__ import annotations

import torch

from distdpo.algorithms.compression import Compressor, Draws
from distdpo.topology import Topology


class CompressedGossip:
    """Compressed gossip on the rows ``comm`` holds; the public copies are those of the nodes its W rows touch."""

    def __init__(
        self,
        comm,
        topology: Topology,
        compressor: Compressor,
        theta0: torch.Tensor,
        *,
        memory: bool,
        consensus_lr: float | None,
        seed: int,
    ):
        self.comm, self.topology, self.q = comm, topology, compressor
        self.memory, self.gamma = memory, consensus_lr
        self.draws = Draws(seed)
        cols, _ = comm.neighbourhood(0)
        self.own = torch.searchsorted(cols, comm.local_nodes).to(theta0.device)  # local rows among the columns
        self.public = theta0.expand(len(cols), -1).clone()
        diag = torch.as_tensor(topology.matrix(0).diagonal().copy(), dtype=theta0.dtype, device=theta0.device)
        self.self_weight = diag[comm.local_nodes.to(theta0.device)][:, None]  # w_ii of the local rows

    def mix(self, X: torch.Tensor, round_index: int) -> torch.Tensor:
        u = self.draws(self.q, self.comm.local_nodes)
        payload = self.q.encode(X - self.public[self.own] if self.memory else X, u)
        decoded = self.q.decode(self.comm.exchange(payload, round_index))
        self.public = self.public + decoded if self.memory else decoded
        _, W = self.comm.neighbourhood(round_index)
        if self.gamma is not None:
            return X + self.gamma * (W @ self.public - self.public[self.own])
        return W @ self.public + self.self_weight * (X - self.public[self.own])

    def round_bytes(self, round_index: int) -> int:
        return self.topology.messages_per_round(round_index) * self.q.nbytes

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.draws.state_dict(), "gossip.public": self.public}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.draws.load_state_dict(state)
        self.public = state["gossip.public"].to(self.public)
