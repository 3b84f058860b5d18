"""The in-process simulator: all n nodes' rows in one tensor; communication is tensor algebra."""

from __future__ import annotations

import torch

from distdpo.topology import Topology


class SimulatedCommunicator:
    """``aggregate`` is a weighted sum over rows, ``mix`` is W_t @ X (dense, or sparse CSR when W is sparse)."""

    def __init__(
        self,
        num_nodes: int,
        topology: Topology | None = None,
        *,
        sparse: bool | str = "auto",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
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

    def neighbourhood(self, round_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.local_nodes, self._matrix(round_index)

    def exchange(self, values: torch.Tensor, round_index: int) -> torch.Tensor:
        return values

    def gather_rows(self, values: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
        return values


def run(cfg, label: str, cache, *, progress: bool = True):
    """Train one configuration in this process; returns (metric rows, summary entry)."""
    from distdpo import build
    from distdpo.checkpoint import RunCheckpoint
    from distdpo.engines.loop import train_rounds
    from distdpo.metrics import Recorder

    task = cache.task(cfg)
    weights = build.client_weights(cfg, task.client_sizes)
    topology = build.build_topology(cfg, task.num_clients)
    sparse = {"auto": "auto", "dense": False, "sparse": True}[cfg.engine.sparse_mix]
    comm = SimulatedCommunicator(
        task.num_clients, topology, sparse=sparse, dtype=build.torch_dtype(cfg), device=build.device(cfg)
    )
    algo = build.build_algorithm(cfg, task, comm, topology, weights)
    rec = Recorder(cfg, label, task, weights, topology, cache.optimum(cfg, task, weights))
    ckpt = RunCheckpoint(cfg, label, fingerprint=cache.fingerprint(cfg))  # continues from engine.checkpoint_dir/<label>
    theta = train_rounds(cfg, label, algo, rec, ckpt, progress=progress, device=comm.device)
    return rec.rows, rec.summary(theta)
