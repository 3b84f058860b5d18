"""f★ for the convex (log-linear) case: Newton's method with backtracking, in float64.

The optimality gap f(θ̄) − f★ in the metrics is only as good as f★, so the
solver runs until ‖∇f‖ is at round-off level and reports what it reached.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch


@dataclass
class Solution:
    theta: torch.Tensor
    f_star: float
    grad_norm: float
    iterations: int
    converged: bool


def solve_centralized(task, weights: torch.Tensor, *, tol: float = 1e-11, max_iter: int = 100) -> Solution:
    """Minimize f(θ) = Σ_i weights_i f_i(θ) over the pooled data (``task.objective`` must be convex)."""
    theta = task.initial_params().detach().to(torch.float64).cpu().clone()

    def f(t: torch.Tensor) -> torch.Tensor:
        return task.objective(t, weights)

    def value_and_grad(t: torch.Tensor):
        t = t.detach().requires_grad_(True)
        v = f(t)
        (g,) = torch.autograd.grad(v, t)
        return v.detach(), g

    value, grad = value_and_grad(theta)
    it = 0
    for it in range(1, max_iter + 1):
        if grad.norm() < tol:
            break
        H = torch.autograd.functional.hessian(f, theta)
        H = 0.5 * (H + H.T)
        try:
            step = torch.linalg.solve(H + 1e-12 * torch.eye(len(theta), dtype=H.dtype), grad)
        except torch.linalg.LinAlgError:
            step = grad
        t = 1.0
        while True:  # Armijo backtracking keeps Newton globally convergent
            cand_v, cand_g = value_and_grad(theta - t * step)
            if cand_v <= value - 1e-4 * t * (grad @ step) or t < 1e-10:
                break
            t *= 0.5
        if cand_v > value:  # no decrease possible at float64 resolution
            break
        theta, value, grad = theta - t * step, cand_v, cand_g
    converged = bool(grad.norm() < 1e-6)
    if not converged:
        warnings.warn(
            f"centralized solver stopped at ‖∇f‖ = {grad.norm():.3g} after {it} Newton steps; "
            "the data may be separable (no finite minimizer), so optimality gaps are approximate",
            stacklevel=2,
        )
    return Solution(theta, float(value), float(grad.norm()), it, converged)
