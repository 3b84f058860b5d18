"""The in-process simulator: all n nodes' rows in one tensor; communication is tensor algebra."""

from __future__ import annotations

import torch

from distdpo.topology import Topology


class SimulatedCommunicator:
    """``aggregate`` is a weighted sum over rows, ``mix`` is W_t @ X (dense, or sparse CSR when W is sparse)."""

    def __init__(self, num_nodes: int, topology: Topology | None = None, *, sparse: bool | str = "auto",
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.num_nodes = num_nodes
        self.local_nodes = torch.arange(num_nodes)
        self.topology = topology
        self.dtype, self.device = dtype, torch.device(device)
        self._matrices: dict[int, torch.Tensor] = {}
        if topology is not None and sparse == "auto":
            density = (topology.W != 0).mean()
            sparse = num_nodes >= 64 and density < 0.1
        self.sparse = bool(sparse)

    def aggregate(self, values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return weights.to(values.dtype) @ values

    def _matrix(self, round_index: int) -> torch.Tensor:
        period = len(self.topology.schedule) if self.topology.schedule else 1
        key = round_index % period
        if key not in self._matrices:
            W = torch.as_tensor(self.topology.matrix(round_index), dtype=self.dtype, device=self.device)
            self._matrices[key] = W.to_sparse_csr() if self.sparse else W
        return self._matrices[key]

    def mix(self, values: torch.Tensor, round_index: int) -> torch.Tensor:
        if self.topology is None:
            raise RuntimeError("mix() needs a topology: this run has none (is the algorithm decentralized?)")
        return self._matrix(round_index) @ values
