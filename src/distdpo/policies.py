"""Policies over featurized actions, evaluated on a stack of node parameters.

Every method takes ``X`` of shape ``[m, p]`` — one flat parameter row per
node — and feature tensors whose leading dimension is the same ``m``, so one
call evaluates the policies of many nodes at once.
"""

from __future__ import annotations

import math

import torch


class FeaturePolicy:
    """π_θ(a|x) ∝ exp(s_θ(φ(x, a))) for a scalar score function ``s_θ``."""

    num_params: int

    def scores(self, X: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Scores ``s_θ(φ)`` of features ``[m, ..., d]`` under each row of ``X`` → ``[m, ...]``."""
        raise NotImplementedError

    def init_params(self, generator: torch.Generator, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        raise NotImplementedError

    def pair_inputs(self, phi_w: torch.Tensor, phi_l: torch.Tensor) -> torch.Tensor:
        """What :meth:`log_odds` needs of a pair, stored once per pair: here both feature vectors."""
        return torch.stack([phi_w, phi_l], dim=-2)

    def log_odds(self, X: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        """log π(y_w|x) − log π(y_l|x) for pairs sharing a context: the normalizer cancels exactly."""
        s = self.scores(X, pairs)
        return s[..., 0] - s[..., 1]

    def logps(self, X: torch.Tensor, features: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """log π(a|x) for features ``[m, B, A, d]`` and actions ``[m, B]`` → ``[m, B]``."""
        logp = torch.log_softmax(self.scores(X, features), dim=-1)
        return torch.gather(logp, -1, actions.unsqueeze(-1)).squeeze(-1)


class LogLinearPolicy(FeaturePolicy):
    """π_θ(a|x) ∝ exp(θᵀφ(x, a)): DPO on it is convex (a logistic regression in θ − θ_ref)."""

    def __init__(self, dim: int):
        self.dim = dim
        self.num_params = dim

    def scores(self, X: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        flat = features.reshape(features.shape[0], -1, self.dim)
        # Row form θᵀ[φ…]: its backward is a [1, M] @ [M, d] bmm, about twice as fast as the column form's.
        return torch.bmm(X.unsqueeze(1), flat.transpose(1, 2)).reshape(features.shape[:-1])

    def init_params(self, generator: torch.Generator, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return torch.zeros(self.dim, dtype=dtype)

    def pair_inputs(self, phi_w: torch.Tensor, phi_l: torch.Tensor) -> torch.Tensor:
        # Scores are linear in φ, so the log-odds is θᵀ(φ_w − φ_l): one vector per pair, one bmm.
        return phi_w - phi_l

    def log_odds(self, X: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        return self.scores(X, pairs)


class MLPPolicy(FeaturePolicy):
    """A one-hidden-layer tanh network score w₂ᵀ tanh(W₁φ + b₁): the non-convex case."""

    def __init__(self, dim: int, hidden: int):
        self.dim, self.hidden = dim, hidden
        self.num_params = hidden * dim + 2 * hidden

    def _unpack(self, X: torch.Tensor):
        h, d = self.hidden, self.dim
        W1 = X[:, : h * d].reshape(-1, h, d)
        b1 = X[:, h * d : h * d + h]
        w2 = X[:, h * d + h :]
        return W1, b1, w2

    def scores(self, X: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        W1, b1, w2 = self._unpack(X)
        flat = features.reshape(features.shape[0], -1, self.dim)  # [m, M, d]
        hidden = torch.tanh(torch.bmm(flat, W1.transpose(1, 2)) + b1.unsqueeze(1))
        return torch.bmm(hidden, w2.unsqueeze(-1)).reshape(features.shape[:-1])

    def init_params(self, generator: torch.Generator, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        W1 = torch.randn(self.hidden, self.dim, generator=generator, dtype=dtype) / math.sqrt(self.dim)
        b1 = torch.zeros(self.hidden, dtype=dtype)
        w2 = torch.randn(self.hidden, generator=generator, dtype=dtype) / math.sqrt(self.hidden)
        return torch.cat([W1.flatten(), b1, w2])
