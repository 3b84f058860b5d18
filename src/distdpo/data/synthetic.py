"""The personalized preference model of distributed DPO, with ground truth.

Each pair has a context x with ``num_actions`` candidate actions whose features
φ(x, a) ∈ R^d are standard normal. User i's reward is r_i(x, a) = θ_iᵀφ(x, a)
with θ_i = θ★ + heterogeneity · u_i (the u_i are centred, so θ★ is the mean
user). Each user's offline data is collected by the behaviour policy
π_ref(a|x) ∝ exp(θ_refᵀφ(x, a)) (two distinct actions per context) and
labelled by Bradley–Terry with the user's *own* reward, then flipped with
probability ``label_noise``. Nothing here is real human data: it exists so
that runs can be held against the true θ★ and θ_i.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class FeaturePreferenceData:
    """Padded per-client preference pairs over featurized actions.

    ``features[i, j]`` are the features of all actions of pair j of client i;
    ``chosen``/``rejected`` index into them; rows past ``sizes[i]`` are padding.
    ``eval_*`` is a held-out split per client; ``eval_true_order`` says whether
    the user's true reward prefers the labelled ``chosen`` action.
    """

    features: torch.Tensor  # [n, N, A, d]
    chosen: torch.Tensor  # [n, N] long
    rejected: torch.Tensor  # [n, N] long
    sizes: torch.Tensor  # [n] long
    eval_features: torch.Tensor  # [n, Ne, A, d]
    eval_chosen: torch.Tensor
    eval_rejected: torch.Tensor
    eval_sizes: torch.Tensor
    # Ground truth, where there is one (text features have none; their reference is uniform: θ_ref = 0).
    eval_true_order: torch.Tensor | None = None  # [n, Ne] bool
    theta_star: torch.Tensor | None = None  # [d]
    theta_users: torch.Tensor | None = None  # [n, d]
    theta_ref: torch.Tensor | None = None  # [d]

    @property
    def num_clients(self) -> int:
        return self.features.shape[0]

    @property
    def dim(self) -> int:
        return self.features.shape[-1]


def client_sizes(num_clients: int, pairs_per_client: int, size_skew: float, generator: torch.Generator) -> torch.Tensor:
    """Equal sizes when ``size_skew == 0``; otherwise log-normal sizes with that σ and the same mean."""
    if size_skew == 0:
        return torch.full((num_clients,), pairs_per_client, dtype=torch.long)
    xi = torch.randn(num_clients, generator=generator, dtype=torch.float64)
    sizes = pairs_per_client * torch.exp(size_skew * xi - size_skew**2 / 2)
    return sizes.round().clamp(min=2).long()


def _sample_pairs(
    theta_users: torch.Tensor,
    theta_ref: torch.Tensor,
    sizes: torch.Tensor,
    num_actions: int,
    label_noise: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, ...]:
    n, d = theta_users.shape
    N = int(sizes.max())
    features = torch.randn(n, N, num_actions, d, generator=generator, dtype=torch.float64)
    ref_probs = torch.softmax(features @ theta_ref, dim=-1)  # [n, N, A]
    pair = torch.multinomial(ref_probs.reshape(-1, num_actions), 2, replacement=False, generator=generator)
    pair = pair.reshape(n, N, 2)
    rewards = torch.einsum("nkad,nd->nka", features, theta_users)
    r = torch.gather(rewards, 2, pair)  # [n, N, 2]
    first_wins = torch.rand(n, N, generator=generator, dtype=torch.float64) < torch.sigmoid(r[..., 0] - r[..., 1])
    flip = torch.rand(n, N, generator=generator, dtype=torch.float64) < label_noise
    first_wins = first_wins ^ flip
    chosen = torch.where(first_wins, pair[..., 0], pair[..., 1])
    rejected = torch.where(first_wins, pair[..., 1], pair[..., 0])
    true_order = torch.where(first_wins, r[..., 0] > r[..., 1], r[..., 1] > r[..., 0])
    return features, chosen, rejected, true_order


def make_synthetic(
    num_clients: int = 16,
    pairs_per_client: int = 200,
    eval_pairs_per_client: int = 200,
    dim: int = 16,
    num_actions: int = 8,
    heterogeneity: float = 1.0,
    label_noise: float = 0.0,
    size_skew: float = 0.0,
    reward_scale: float = 2.0,
    reference_scale: float = 0.5,
    seed: int = 0,
) -> FeaturePreferenceData:
    """Sample a personalized preference problem (see the module docstring)."""
    if num_actions < 2:
        raise ValueError(f"data.num_actions must be at least 2, got {num_actions}")
    g = torch.Generator().manual_seed(seed)
    scale = 1 / math.sqrt(dim)
    theta_star = torch.randn(dim, generator=g, dtype=torch.float64) * reward_scale * scale
    u = torch.randn(num_clients, dim, generator=g, dtype=torch.float64) * reward_scale * scale
    if num_clients > 1:
        u = u - u.mean(0)
    theta_users = theta_star + heterogeneity * u
    theta_ref = torch.randn(dim, generator=g, dtype=torch.float64) * reference_scale * scale
    sizes = client_sizes(num_clients, pairs_per_client, size_skew, g)
    feats, chosen, rejected, _ = _sample_pairs(theta_users, theta_ref, sizes, num_actions, label_noise, g)
    eval_sizes = torch.full((num_clients,), eval_pairs_per_client, dtype=torch.long)
    e_feats, e_chosen, e_rejected, e_true = _sample_pairs(
        theta_users, theta_ref, eval_sizes, num_actions, label_noise, g
    )
    return FeaturePreferenceData(
        features=feats,
        chosen=chosen,
        rejected=rejected,
        sizes=sizes,
        eval_features=e_feats,
        eval_chosen=e_chosen,
        eval_rejected=e_rejected,
        eval_sizes=eval_sizes,
        eval_true_order=e_true,
        theta_star=theta_star,
        theta_users=theta_users,
        theta_ref=theta_ref,
    )
