"""The privacy that client-level DP (Flower's fixed-clipping wrappers) spends, as (ε, δ) after each round.

Each round is one sampled Gaussian mechanism on the clients' clipped updates: S of n clients
(q = S/n), noise of standard deviation σ·C/S added to their average. Opacus's RDP accountant
composes the rounds and converts to ε at ``engine.dp_delta``. Its bound is the one for Poisson
sampling at rate q, the usual stand-in for distdpo's fixed-size sampling (exact when S = n, q = 1).
"""

from __future__ import annotations

import math

import torch


def noise_multiplier(sigma: float, num_examples: torch.Tensor, sampled: int, replies: int) -> float:
    """σ relative to one client's largest possible share of the aggregate (its sensitivity).

    Flower's noise, σ·C/S, is calibrated for a uniform average of S updates; one client's clipped
    update moves a weighted average by at most w_max·C, where w_max is its weight when it sends the
    most examples and the other ``replies − 1`` repliers the fewest. Uniform weighting over S
    replies gives back σ.
    """
    if sigma == 0:
        return 0.0
    sizes = torch.as_tensor(num_examples, dtype=torch.float64)
    w_max = 0.0
    for i in range(len(sizes)):
        others = torch.cat([sizes[:i], sizes[i + 1 :]]).sort().values[: replies - 1]
        w_max = max(w_max, float(sizes[i] / (sizes[i] + others.sum())))
    return sigma / (sampled * w_max)


def epsilon(sigma: float, sample_rate: float, rounds: int, delta: float) -> float:
    """ε after ``rounds`` sampled Gaussian mechanisms of noise multiplier ``sigma`` (opacus's RDP accountant)."""
    if rounds == 0:
        return 0.0
    if sigma == 0:
        return math.inf  # clipping without noise: no privacy
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(sigma, sample_rate, rounds)]
    return float(accountant.get_epsilon(delta))


class PrivacyLedger:
    """ε at ``engine.dp_delta`` after each round of a DP run, and the summary's account of it."""

    def __init__(self, cfg, num_examples: torch.Tensor, sampled: int, replies: int):
        e = cfg.engine
        self.delta = e.dp_delta
        self.sample_rate = sampled / len(num_examples)
        self.sigma = noise_multiplier(e.dp_noise, num_examples, sampled, replies)

    def epsilon(self, rounds: int) -> float:
        return epsilon(self.sigma, self.sample_rate, rounds, self.delta)

    def summary(self, rounds: int) -> dict:
        return {
            "epsilon": self.epsilon(rounds),
            "delta": self.delta,
            "rounds": rounds,
            "noise_multiplier": self.sigma,
            "sample_rate": self.sample_rate,
            "accountant": "opacus RDPAccountant (sampled Gaussian mechanism, one step per round)",
        }
