"""Theory quantities of a problem instance and the rate / floor forms the paper's claims rest on.

Estimates for a task (the stacked workload of :mod:`distdpo.tasks`) and a
client weighting p (``build.client_weights``):

* :func:`smoothness_bound` — closed-form L for the log-linear policy. DPO on
  π_θ ∝ exp(θᵀφ) is f(θ) = Σ_i p_i (1/N_i) Σ_j ℓ(θᵀz_ij − c_ij), z = φ_w − φ_l,
  so ∇²f = Σ_i p_i (1/N_i) Σ_j ℓ''(·) z_ij z_ijᵀ and L ≤ sup ℓ'' · λ_max(M),
  M = Σ_i p_i (1/N_i) Σ_j z_ij z_ijᵀ, with sup ℓ'' = β²/4 for the sigmoid,
  cDPO and robust losses, 2 for IPO; the hinge loss is not smooth (None).
* :func:`hessian_top_eigenvalue` — power iteration on Hessian-vector products
  of ``task.objective`` (autograd); the local L at θ.
  :func:`hessian_top_eigenpair_fd` — the same power iteration on
  finite-difference products of any gradient function (language models).
* :func:`heterogeneity` — ζ²(θ) = (1/n) Σ_i ‖∇f_i(θ) − ∇f(θ)‖².
* :func:`grad_noise` — σ², the variance of a one-pair stochastic gradient.
* :func:`spectral_gap` — 1 − λ, λ = max(|λ_2(W)|, |λ_n(W)|).

Rate / floor forms (orders, constants dropped; each names its source). They
are the *predicted dependences* that :mod:`distdpo.reproduce` holds against
measurements, not tight numerical predictions:

* Local SGD / FedAvg with a constant step η and K = E local steps
  (Koloskova et al. 2020, "A unified theory of decentralized SGD with changing
  topology and local updates", Thm 2 with W = J; Woodworth, Patel & Srebro 2020,
  "Minibatch vs local SGD for heterogeneous distributed learning"):
  floor ≍ η σ²/(nB) + L η² (E − 1) σ²/B + L η² (E − 1)² ζ²  — :func:`fedavg_floor`.
  Full batch (σ² = 0) leaves the client-drift term ∝ η²(E−1)²ζ², zero at E = 1.
* Partial participation, S of n clients sampled without replacement
  (Yang, Fang & Liu 2021, "Achieving linear speedup with partial worker
  participation in non-IID federated learning"; Karimireddy et al. 2020,
  SCAFFOLD, Thm I: a (1 − S/n) ζ²/S term): the sampled update has variance
  ∝ ζ² (n − S)/(S (n − 1)), giving floor ≍ η ζ² (1/S − 1/n) · n/(n−1)  —
  :func:`partial_participation_floor`.
* DSGD consensus distance (Koloskova et al. 2020, Lemma on the consensus
  distance): Ξ ≲ η² ζ²/(1−λ)² + η² σ²/(1−λ)  — :func:`dsgd_consensus_bound`;
  the reference code base's form η²σ²/(1−ρ²) (stationary variance of
  x ← ρ(x − η ξ)) — :func:`dsgd_consensus_codebase`; and the exact stationary
  value of the linearized recursion Δ = W(Δ − η(I−J)g) when ζ² is spread
  evenly over W's eigenvectors, η² ζ² mean_k λ_k²/(1−λ_k)² (for noise: η² σ² mean_k λ_k²/(1−λ_k²))  —
  :func:`dsgd_consensus_spectral`.
* Rounds to reach ε over a graph (Koloskova et al. 2020, Thm 2; Koloskova,
  Lin & Stich 2021, "An improved analysis of gradient tracking"): the
  topology-dependent term grows as 1/(1 − λ)  — :func:`rounds_to_eps`.
* Staleness q_max (Stich & Karimireddy 2020, "The error-feedback framework";
  Mishchenko et al. 2022, "Asynchronous SGD beats minibatch SGD under
  arbitrary delays"): delayed SGD adds ≍ L η² q_max σ²/B to the floor; with
  exact gradients the fixed point is unchanged (no floor)  — :func:`staleness_floor`.
* Drift-corrected methods — SCAFFOLD (Karimireddy et al. 2020) and gradient
  tracking (Nedić, Olshevsky & Shi 2017, DIGing; Koloskova et al. 2021) — have
  no ζ² term: their full-batch floor is 0.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = [
    "smoothness_bound",
    "hessian_top_eigenvalue",
    "hessian_top_eigenpair_fd",
    "hessian_eigenvalues",
    "heterogeneity",
    "grad_noise",
    "spectral_gap",
    "fedavg_floor",
    "partial_participation_floor",
    "dsgd_consensus_bound",
    "dsgd_consensus_codebase",
    "dsgd_consensus_spectral",
    "rounds_to_eps",
    "staleness_floor",
    "instance",
]


def _curvature_sup(task) -> float | None:
    """sup_h ℓ''(h) of the task's margin loss, or None where ℓ is not smooth."""
    if task.loss_type in ("sigmoid", "robust"):
        # −log σ(βh) and −log σ(−βh) both have second derivative β² σ(βh) σ(−βh) ≤ β²/4;
        # cDPO mixes them with weights (1−ε, ε); robust DPO with (1−ε, −ε)/(1−2ε): both sum to 1.
        return task.beta**2 / 4
    if task.loss_type == "ipo":
        return 2.0
    return None  # hinge: not differentiable at the kink


def _pair_second_moment(task, weights: torch.Tensor) -> torch.Tensor:
    """M = Σ_i p_i (1/N_i) Σ_j w_ij z_ij z_ijᵀ over the task's (padded, weighted) pairs."""
    z, _, w = task.margin_features(weights)  # z = φ_w − φ_l per pair (the margin is linear in θ), w its weight
    return (z * w[:, None]).T @ z


def smoothness_bound(task, weights: torch.Tensor) -> float | None:
    """Closed-form L ≥ λ_max(∇²f(θ)) for every θ (log-linear policy); None if no bound applies."""
    if not task.convex:  # the log-linear policy: only then is the margin linear in θ
        return None
    sup = _curvature_sup(task)
    if sup is None:
        return None
    M = _pair_second_moment(task, weights)
    return float(sup * torch.linalg.eigvalsh(0.5 * (M + M.T))[-1])


def _hvp_fn(task, weights: torch.Tensor, theta: torch.Tensor):
    theta = theta.detach().to(torch.float64).cpu().clone().requires_grad_(True)
    value = task.objective(theta, weights)
    (grad,) = torch.autograd.grad(value, theta, create_graph=True)

    def hvp(v: torch.Tensor) -> torch.Tensor:
        (hv,) = torch.autograd.grad(grad, theta, v, retain_graph=True)
        return hv.detach()

    return hvp, theta.numel()


class _single_thread:
    """Many tiny sequential ops: intra-op threads only add synchronization (and stall on a shared machine)."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)


def hessian_top_eigenvalue(
    task, weights: torch.Tensor, theta: torch.Tensor, iters: int = 200, tol: float = 1e-10, seed: int = 0
) -> float:
    """λ_max(∇²f(θ)) by power iteration on autograd Hessian-vector products (f convex: λ_max = ‖H‖)."""
    with _single_thread():
        hvp, p = _hvp_fn(task, weights, theta)
        return _power_iteration(hvp, p, iters, tol, seed)[0]


def hessian_top_eigenpair_fd(
    grad_fn, theta: torch.Tensor, iters: int = 20, tol: float = 1e-3, eps: float = 1e-2, seed: int = 0
) -> tuple[float, torch.Tensor]:
    """The eigenvalue of ∇²f(θ) largest in modulus and its unit eigenvector, by power iteration on central finite
    differences Hv ≈ (∇f(θ+εv) − ∇f(θ−εv)) / 2ε of a gradient function: for models (language models) whose loss is
    not twice differentiable in one graph cheaply. For a non-convex f the value may be negative; |·| bounds L
    locally."""
    theta = theta.detach().to(torch.float64).cpu()

    def hvp(v: torch.Tensor) -> torch.Tensor:
        plus, minus = grad_fn(theta + eps * v), grad_fn(theta - eps * v)
        return (plus.to(torch.float64).cpu() - minus.to(torch.float64).cpu()) / (2 * eps)

    return _power_iteration(hvp, theta.numel(), iters, tol, seed)


def _power_iteration(hvp, p: int, iters: int, tol: float, seed: int) -> tuple[float, torch.Tensor]:
    """(Rayleigh quotient, the unit vector it was taken at) after convergence or ``iters`` products."""
    v = torch.randn(p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    v /= v.norm()
    lam, at = 0.0, v
    for _ in range(iters):
        hv = hvp(v)
        new = float(v @ hv)  # Rayleigh quotient
        norm = hv.norm()
        if norm == 0:
            return 0.0, v
        converged = abs(new - lam) <= tol * max(abs(new), 1e-300)
        lam, at, v = new, v, hv / norm
        if converged:
            break
    return lam, at


def hessian_eigenvalues(task, weights: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Every eigenvalue of ∇²f(θ) (ascending), from the full autograd Hessian: for small models only."""
    theta = theta.detach().to(torch.float64).cpu().clone()
    H = torch.autograd.functional.hessian(lambda t: task.objective(t, weights), theta)
    return torch.linalg.eigvalsh(0.5 * (H + H.T))


def heterogeneity(task, weights: torch.Tensor, theta: torch.Tensor) -> float:
    """ζ²(θ) = (1/n) Σ_i ‖∇f_i(θ) − ∇f(θ)‖², ∇f = Σ_i p_i ∇f_i (full batch, float64)."""
    return float(task.evaluate(theta, weights)["heterogeneity"])


def grad_noise(task, theta: torch.Tensor) -> float:
    """σ²: variance of a one-pair stochastic gradient around ∇f_i(θ), averaged over clients (σ²/B for a batch of B)."""
    return float(task.grad_noise(theta))


def spectral_gap(topology) -> float:
    """1 − λ with λ = max(|λ_2(W)|, |λ_n(W)|) (for a time-varying schedule: the per-round rate of its period)."""
    return float(topology.spectral()["spectral_gap"])


# --------------------------------------------------------------------------- rate / floor forms


def fedavg_floor(
    lr: float,
    local_steps: int,
    zeta2: float,
    sigma2: float = 0.0,
    L: float = 1.0,
    batch_size: int | None = None,
    num_clients: int = 1,
) -> float:
    """FedAvg / local SGD floor ≍ η σ²/(nB) + L η² (E−1) σ²/B + L η² (E−1)² ζ².

    Koloskova et al. 2020; Woodworth et al. 2020.
    """
    s2 = 0.0 if batch_size is None else sigma2 / batch_size
    e = local_steps - 1
    return lr * s2 / num_clients + L * lr**2 * e * s2 + L * lr**2 * e**2 * zeta2


def partial_participation_floor(lr: float, zeta2: float, clients_per_round: int, num_clients: int) -> float:
    """Sampling floor ≍ η ζ² (1/S − 1/n)·n/(n−1): variance of the mean of S of n clients drawn without replacement."""
    if num_clients <= 1 or clients_per_round >= num_clients:
        return 0.0
    return lr * zeta2 * (1 / clients_per_round - 1 / num_clients) * num_clients / (num_clients - 1)


def dsgd_consensus_bound(lr: float, zeta2: float, lam: float, sigma2: float = 0.0) -> float:
    """Koloskova et al. 2020: Ξ ≲ η² ζ²/(1−λ)² + η² σ²/(1−λ)."""
    gap = 1.0 - lam
    return math.inf if gap <= 0 else lr**2 * zeta2 / gap**2 + lr**2 * sigma2 / gap


def dsgd_consensus_codebase(lr: float, sigma2: float, rho: float) -> float:
    """The reference code base's form η² σ²/(1 − ρ²): stationary variance of x ← ρ(x − η ξ)."""
    return math.inf if rho >= 1 else lr**2 * sigma2 / (1 - rho**2)


def dsgd_consensus_spectral(lr: float, zeta2: float, W: np.ndarray, *, noise: bool = False) -> float:
    """Linearized stationary Ξ over all eigenvalues of W, the disagreement spread evenly over its eigenvectors:
    a fixed heterogeneity ζ² gives η² ζ² · mean_{k≥2} λ_k²/(1−λ_k)²; independent noise of variance σ²
    (``noise=True``, pass σ² as ``zeta2``) gives η² σ² · mean_{k≥2} λ_k²/(1−λ_k²)."""
    ev = np.sort(np.linalg.eigvalsh(0.5 * (np.asarray(W) + np.asarray(W).T)))[:-1]  # drop the consensus eigenvalue 1
    if len(ev) == 0:
        return 0.0
    return float(lr**2 * zeta2 * np.mean(ev**2 / ((1 - ev**2) if noise else (1 - ev) ** 2)))


def rounds_to_eps(spectral_gap_value: float, base_rounds: float = 0.0, scale: float = 1.0) -> float:
    """Rounds to reach ε over a graph ≍ T_opt + c/(1−λ): the topology term of Koloskova et al. 2020 (Thm 2)."""
    return math.inf if spectral_gap_value <= 0 else base_rounds + scale / spectral_gap_value


def staleness_floor(lr: float, q_max: int, sigma2: float, L: float = 1.0, batch_size: int | None = None) -> float:
    """Extra floor of delayed SGD ≍ L η² q_max σ²/B (0 with exact gradients: a delay does not move the fixed point)."""
    s2 = 0.0 if batch_size is None else sigma2 / batch_size
    return L * lr**2 * q_max * s2


# --------------------------------------------------------------------------- an instance


def instance(
    task, weights: torch.Tensor, theta_star: torch.Tensor | None = None, *, with_spectrum: bool = True
) -> dict[str, Any]:
    """The theory quantities of one problem instance, at θ★ (or at the initial model when θ★ is unknown)."""
    at = theta_star if theta_star is not None else task.initial_params()
    out: dict[str, Any] = {
        "num_clients": task.num_clients,
        "num_params": task.num_params,
        "L_bound": smoothness_bound(task, weights),
        "L_power_at_theta_star": hessian_top_eigenvalue(task, weights, at),
        "L_power_at_reference": hessian_top_eigenvalue(task, weights, task.initial_params()),
        "heterogeneity_at_theta_star": heterogeneity(task, weights, at),
        "heterogeneity_at_reference": heterogeneity(task, weights, task.initial_params()),
        "grad_noise": grad_noise(task, at),
        "measured_at": "theta_star" if theta_star is not None else "initial_model",
    }
    if with_spectrum and task.num_params <= 512:
        ev = hessian_eigenvalues(task, weights, at)
        out["mu_at_theta_star"] = float(ev[0])
        out["L_eig_at_theta_star"] = float(ev[-1])
    return out
