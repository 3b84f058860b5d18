"""Centralized DPO on the pooled data: the baseline every distributed method is held against."""

from __future__ import annotations

import torch

from distdpo.algorithms.optim import ClientOptimizer
from distdpo.tasks.base import Task


class Centralized:
    """K optimizer steps per round on one model that sees every client's pairs (no communication)."""

    kind = "centralized"

    def __init__(
        self,
        task: Task,
        *,
        weights: torch.Tensor,
        local_steps: int,
        optimizer: ClientOptimizer,
        batch_size: int | None,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ):
        self.task = task.pooled(weights)
        self.K, self.optimizer, self.batch_size = local_steps, optimizer, batch_size
        self.data_gen = torch.Generator().manual_seed(seed + 1)
        self.X = self.task.initial_params().to(dtype)[None].clone()
        self.state = optimizer.init_state(self.X)  # persists across rounds: one uninterrupted run
        self.node = torch.zeros(1, dtype=torch.long, device=self.X.device)

    def global_params(self) -> torch.Tensor:
        return self.X[0]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a resumed run needs to continue bit for bit (incl. AdamW's moments and step count)."""
        state = {"X": self.X, "rng.data": self.data_gen.get_state()}
        state.update({f"opt.{k}": torch.as_tensor(v) for k, v in self.state.items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.X = state["X"].to(self.X)
        self.data_gen.set_state(state["rng.data"])
        for k, v in state.items():
            if k.startswith("opt."):
                name = k[len("opt.") :]
                self.state[name] = int(v) if name == "t" else v.to(self.X)

    def run_round(self, round_index: int) -> dict[str, float]:
        for _ in range(self.K):
            _, g = self.task.loss_and_grad(self.X, self.node, self.task.sample_batch(self.data_gen, self.batch_size))
            self.X = self.optimizer.step(self.X, g, self.state)
        return {"bytes": 0}
