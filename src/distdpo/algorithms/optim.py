"""Optimizers on stacked rows: the clients' local optimizer and the federated server optimizer."""

from __future__ import annotations

import torch

CLIENT_OPTIMIZERS = ("sgd", "adamw")
SERVER_OPTIMIZERS = ("sgd", "avgm", "nesterov", "adagrad", "adam", "yogi")


class ClientOptimizer:
    """SGD (what the theory analyses) or AdamW, one independent state per row."""

    def __init__(self, name: str, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8):
        if name not in CLIENT_OPTIMIZERS:
            raise ValueError(f"unknown client optimizer {name!r}; expected one of {CLIENT_OPTIMIZERS}")
        self.name, self.lr, self.weight_decay, self.betas, self.eps = name, lr, weight_decay, betas, eps

    def init_state(self, X: torch.Tensor, per_row: bool = False) -> dict:
        """A fresh state; ``per_row``: each row counts its own steps (rows that persist across rounds but do not
        all step every round, as sampled clients)."""
        if self.name == "sgd":
            return {}
        t = torch.zeros(X.shape[0], 1, dtype=X.dtype, device=X.device) if per_row else 0
        return {"m": torch.zeros_like(X), "v": torch.zeros_like(X), "t": t}

    def step(self, X: torch.Tensor, g: torch.Tensor, state: dict) -> torch.Tensor:
        if self.name == "sgd":
            if self.weight_decay:
                g = g + self.weight_decay * X
            return X - self.lr * g
        b1, b2 = self.betas
        state["t"] += 1
        t = state["t"]
        state["m"].mul_(b1).add_(g, alpha=1 - b1)
        state["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
        m_hat = state["m"] / (1 - b1**t)
        v_hat = state["v"] / (1 - b2**t)
        X = X * (1 - self.lr * self.weight_decay)  # decoupled weight decay
        return X - self.lr * m_hat / (v_hat.sqrt() + self.eps)


class ServerOptimizer:
    """Applies the aggregated client update Δ (the negative pseudo-gradient) to the global model.

    ``sgd`` is FedAvg's θ ← θ + η_g Δ; ``avgm`` is FedAvgM (server momentum);
    ``nesterov`` is DiLoCo's outer step (Douillard et al. 2023; PyTorch's SGD with Nesterov momentum on the
    pseudo-gradient −Δ): v ← μv + Δ, θ ← θ + η_g (Δ + μv);
    ``adagrad``/``adam``/``yogi`` are FedAdagrad/FedAdam/FedYogi of Reddi et
    al. (2021, Algorithm 2), without bias correction, as in the paper.
    """

    def __init__(self, name: str, lr: float, momentum: float = 0.9, beta2: float = 0.99, tau: float = 1e-3):
        if name not in SERVER_OPTIMIZERS:
            raise ValueError(f"unknown server optimizer {name!r}; expected one of {SERVER_OPTIMIZERS}")
        self.name, self.lr, self.momentum, self.beta2, self.tau = name, lr, momentum, beta2, tau
        self.state: dict[str, torch.Tensor] = {}

    def step(self, theta: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        if self.name == "sgd":
            return theta + self.lr * delta
        if self.name in ("avgm", "nesterov"):
            v = self.state.get("momentum", torch.zeros_like(delta))
            self.state["momentum"] = v = self.momentum * v + delta
            return theta + self.lr * (delta + self.momentum * v if self.name == "nesterov" else v)
        m = self.state.get("m", torch.zeros_like(delta))
        v = self.state.get("v", torch.full_like(delta, self.tau**2))
        m = self.momentum * m + (1 - self.momentum) * delta
        d2 = delta * delta
        if self.name == "adagrad":
            v = v + d2
        elif self.name == "adam":
            v = self.beta2 * v + (1 - self.beta2) * d2
        else:  # yogi
            v = v - (1 - self.beta2) * d2 * torch.sign(v - d2)
        self.state["m"], self.state["v"] = m, v
        return theta + self.lr * m / (v.sqrt() + self.tau)
