"""f★ for the convex (log-linear) case, with a certificate of how it was obtained.

The optimality gap f(θ̄) − f★ in the metrics is only as good as f★, so each
loss gets a solver that can prove what it reports:

* ``sigmoid``, ``ipo`` (and ``robust`` when it is bounded below): Newton's
  method with backtracking in float64, run until ‖∇f‖ is at round-off level;
  certified by the final gradient norm (relative to the one at the reference)
  and the Newton decrement.
* ``hinge``: relu(1 − βh) is piecewise linear, so its Hessian is zero and
  Newton cannot move; the margin h = Aθ − b is linear in θ for the log-linear
  policy, so min Σ_k w_k relu(1 − β h_k) is solved exactly as a linear program
  (HiGHS), certified by the LP status and by the dual bound.
* ``robust`` with ε > 0: ℓ(h) = softplus(−βh) − ε/(1−2ε)·βh, which is not
  bounded below when some direction d raises the margins' linear reward faster
  than it lowers the misordered ones. A second LP finds such a d when one
  exists; then f(θ₀ + td) ≤ f(θ₀) + tβ·r(d) → −∞ (r(d) < 0 is recomputed
  exactly from d), there is no minimizer, and no f★ is reported.

A :class:`Solution` with ``f_star is None`` means "no optimality gap"; its
``note`` says why.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

GRAD_RTOL = 1e-6  # converged: ‖∇f(θ★)‖ ≤ GRAD_RTOL · max(1, ‖∇f(θ_ref)‖)
LP_RTOL = 1e-9  # LP certified: primal f(θ★) and dual bound agree to LP_RTOL · max(1, |f★|)


@dataclass
class Solution:
    theta: torch.Tensor | None  # None: there is no minimizer (f unbounded below, or not certified)
    f_star: float | None  # None: no optimality gap can be reported (see ``note``)
    grad_norm: float | None  # ‖∇f(θ★)‖ (None where f is not differentiable at θ★ or there is no θ★)
    iterations: int
    converged: bool  # the certificate holds
    method: str = "newton"  # "newton" | "linprog" | "recession_lp" | "none"
    certificate: dict[str, Any] = field(default_factory=dict)
    note: str | None = None  # why f★ is missing or only approximate

    def describe(self) -> dict[str, Any]:
        """The run summary's ``solver`` entry (JSON-ready)."""
        out = {
            "method": self.method,
            "converged": self.converged,
            "iterations": self.iterations,
            "grad_norm": self.grad_norm,
            "certificate": self.certificate,
        }
        if self.note:
            out["note"] = self.note
        return out


def solve_centralized(task, weights: torch.Tensor, *, tol: float = 1e-11, max_iter: int = 100) -> Solution:
    """Minimize f(θ) = Σ_i weights_i f_i(θ) over the pooled data (``task.objective`` must be convex)."""
    loss = getattr(task, "loss_type", "sigmoid")
    linear = hasattr(task, "margin_features")
    if loss == "hinge":
        sol = (
            solve_hinge_lp(task, weights)
            if linear
            else _no_star(
                "hinge loss is piecewise linear (Newton cannot certify a minimum) and this task exposes no "
                "linear margin for an LP: no optimality gap"
            )
        )
    elif loss == "robust" and getattr(task, "label_smoothing", 0.0) > 0:
        sol = (
            robust_descent_ray(task, weights)
            if linear
            else _no_star(
                "robust loss with label_smoothing > 0 may be unbounded below and this task exposes no linear "
                "margin to check: no optimality gap"
            )
        )
        if sol is None:  # bounded below: smooth and convex, so Newton
            return _newton(task, weights, tol=tol, max_iter=max_iter)
    else:
        return _newton(task, weights, tol=tol, max_iter=max_iter)
    if sol.note:
        warnings.warn(sol.note, stacklevel=2)
    return sol


def _no_star(note: str, method: str = "none", certificate: dict | None = None, iterations: int = 0) -> Solution:
    return Solution(None, None, None, iterations, False, method, certificate or {}, note)


# ---- smooth losses: Newton ---------------------------------------------------------------


def _newton(task, weights: torch.Tensor, *, tol: float, max_iter: int) -> Solution:
    theta = task.initial_params().detach().to(torch.float64).cpu().clone()

    def f(t: torch.Tensor) -> torch.Tensor:
        return task.objective(t, weights)

    def value_and_grad(t: torch.Tensor):
        t = t.detach().requires_grad_(True)
        v = f(t)
        (g,) = torch.autograd.grad(v, t)
        return v.detach(), g

    def newton_step(t: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        H = torch.autograd.functional.hessian(f, t)
        H = 0.5 * (H + H.T)
        try:
            return torch.linalg.solve(H + 1e-12 * torch.eye(len(t), dtype=H.dtype), g)
        except torch.linalg.LinAlgError:
            return g

    value, grad = value_and_grad(theta)
    grad0 = float(grad.norm())
    it = 0
    for it in range(1, max_iter + 1):
        if grad.norm() < tol:
            break
        step = newton_step(theta, grad)
        t = 1.0
        while True:  # Armijo backtracking keeps Newton globally convergent
            cand_v, cand_g = value_and_grad(theta - t * step)
            if cand_v <= value - 1e-4 * t * (grad @ step) or t < 1e-10:
                break
            # At round-off level f cannot show a decrease any more (f − f★ ≈ ‖∇f‖²/μ ≪ eps·|f|):
            # take the full Newton step when it shrinks ∇f and leaves f flat to a few ulps.
            if t == 1.0 and cand_g.norm() < 0.5 * grad.norm() and cand_v <= value + 8e-16 * abs(value):
                break
            t *= 0.5
        if not (cand_v < value or (cand_v <= value + 8e-16 * abs(value) and cand_g.norm() < 0.5 * grad.norm())):
            break  # no progress possible at float64 resolution
        theta, value, grad = theta - t * step, cand_v, cand_g
    gnorm = float(grad.norm())
    threshold = GRAD_RTOL * max(1.0, grad0)
    converged = bool(gnorm <= threshold)
    # Newton decrement λ²/2 = ½ gᵀH⁻¹g: the local estimate of f(θ) − f★ (quadratic model).
    decrement = float(0.5 * grad @ newton_step(theta, grad)) if gnorm > 0 else 0.0
    cert = {
        "grad_norm": gnorm,
        "grad_norm_at_reference": grad0,
        "grad_tol": threshold,
        "newton_decrement_half": decrement,
    }
    note = None
    if not converged:
        note = (
            f"centralized solver stopped at ‖∇f‖ = {gnorm:.3g} (> {threshold:.3g}) after {it} Newton steps; "
            "the data may be separable (no finite minimizer), so f★ is only an upper bound on inf f and "
            "optimality gaps are approximate (they may be negative)"
        )
        warnings.warn(note, stacklevel=3)
    return Solution(theta, float(value), gnorm, it, converged, "newton", cert, note)


# ---- hinge: an exact LP --------------------------------------------------------------------


def _linprog(cost, A_ub, b_ub, bounds):
    from scipy.optimize import linprog

    return linprog(
        cost,
        A_ub=A_ub,
        b_ub=b_ub,
        bounds=bounds,
        method="highs",
        options={"primal_feasibility_tolerance": 1e-10, "dual_feasibility_tolerance": 1e-10},
    )


def solve_hinge_lp(task, weights: torch.Tensor) -> Solution:
    """min_θ Σ_k w_k relu(1 − β(a_kᵀθ − b_k)) as the LP min Σ w_k s_k, s_k ≥ 1 − β(a_kᵀθ − b_k), s ≥ 0.

    Certified by HiGHS' status 0 and, independently, by the dual: any 0 ≤ λ ≤ w with Aᵀλ = 0
    gives f(θ) ≥ Σ_k λ_k (1 + β b_k) for every θ, so f(θ★) − that bound bounds the error of f★.
    """
    import scipy.sparse as sp

    A, b, w = (t.numpy() for t in task.margin_features(weights))
    K, p = A.shape
    beta = float(task.beta)
    cost = np.concatenate([np.zeros(p), w])
    A_ub = sp.hstack([sp.csr_matrix(-beta * A), -sp.identity(K, format="csr")], format="csr")
    b_ub = -(1.0 + beta * b)
    res = _linprog(cost, A_ub, b_ub, [(None, None)] * p + [(0, None)] * K)
    cert: dict[str, Any] = {"lp_status": int(res.status), "lp_message": str(res.message)}
    iterations = int(getattr(res, "nit", 0) or 0)
    if res.status == 3:  # cannot happen (the loss is ≥ 0), but say so rather than report −∞
        return _no_star(
            "hinge LP reported unbounded (impossible for a loss ≥ 0: numerical trouble): no optimality gap",
            "linprog",
            cert,
            iterations,
        )
    if res.status != 0:
        return _no_star(
            f"hinge LP did not reach a certified optimum ({res.message}): no optimality gap",
            "linprog",
            cert,
            iterations,
        )
    theta = torch.tensor(res.x[:p], dtype=torch.float64)
    f_star = float(task.objective(theta, weights))  # the very function the metrics evaluate
    lam = np.clip(-np.asarray(res.ineqlin.marginals), 0.0, w)  # dual of s_k ≥ 1 − βh_k, feasible box [0, w_k]
    dual = float(lam @ (1.0 + beta * b))
    residual = float(np.abs(beta * (A.T @ lam)).max()) if p else 0.0  # dual feasibility: βAᵀλ = 0
    scale = max(1.0, abs(f_star))
    cert.update(
        primal_objective=float(res.fun),
        f_at_solution=f_star,
        dual_objective=dual,
        duality_gap=f_star - dual,
        dual_residual=residual,
    )
    converged = bool(
        abs(f_star - dual) <= LP_RTOL * scale and residual <= LP_RTOL * max(1.0, float(np.abs(beta * A).sum(1) @ w))
    )
    note = None
    if not converged:
        note = (
            f"hinge LP solved (status 0) but its dual check is loose (duality gap {f_star - dual:.3g}, "
            f"dual residual {residual:.3g}): f★ is accurate only to about that"
        )
    return Solution(theta, f_star, None, iterations, converged, "linprog", cert, note)


# ---- robust: is it bounded below? -----------------------------------------------------------


def robust_recession(task, weights: torch.Tensor, direction: torch.Tensor) -> float:
    """The asymptotic slope lim_t f(θ + t d)/t of the robust objective along ``direction``, exactly.

    ℓ(h) = softplus(−βh) − c·βh with c = ε/(1−2ε), so the slope is β Σ_k w_k (relu(−u_k) − c u_k), u = A d;
    by convexity f(θ + t d) ≤ f(θ) + t·slope for every θ and t ≥ 0.
    """
    A, _, w = task.margin_features(weights)
    eps = float(task.label_smoothing)
    c = eps / (1 - 2 * eps)
    u = A @ direction.to(torch.float64)
    return float(task.beta * (w @ (torch.relu(-u) - c * u)))


def robust_descent_ray(task, weights: torch.Tensor) -> Solution | None:
    """A certificate that the robust objective is unbounded below, or None when it is bounded below.

    Solves min_{‖d‖∞ ≤ 1} Σ_k w_k (relu(−a_kᵀd) − c a_kᵀd) as an LP; its value is 0 (d = 0) exactly when
    the recession function is ≥ 0 everywhere, i.e. f is bounded below (f ≥ β Σ w_k (relu(−h_k) − c h_k),
    a polyhedral function with the same recession function).
    """
    import scipy.sparse as sp

    A, _, w = (t.numpy() for t in task.margin_features(weights))
    K, p = A.shape
    eps = float(task.label_smoothing)
    c = eps / (1 - 2 * eps)
    cost = np.concatenate([-c * (A.T @ w), w])
    A_ub = sp.hstack([sp.csr_matrix(-A), -sp.identity(K, format="csr")], format="csr")
    res = _linprog(cost, A_ub, np.zeros(K), [(-1.0, 1.0)] * p + [(0, None)] * K)
    if res.status != 0:
        return _no_star(
            f"robust loss: the boundedness LP failed ({res.message}); f★ cannot be certified: no optimality gap",
            "recession_lp",
            {"lp_status": int(res.status), "lp_message": str(res.message)},
        )
    d = torch.tensor(res.x[:p], dtype=torch.float64)
    slope = robust_recession(task, weights, d)
    scale = float(task.beta) * (1 + c) * float(np.abs(A).sum(1) @ w)  # max |slope| over the box
    if not slope < -1e-9 * max(scale, 1e-300):
        return None  # bounded below: Newton (converged or labeled) decides f★
    theta0 = task.initial_params().detach().to(torch.float64).cpu()
    along = {str(t): float(task.objective(theta0 + t * d, weights)) for t in (0.0, 10.0, 100.0, 1000.0)}
    cert = {
        "lp_status": int(res.status),
        "lp_message": str(res.message),
        "unbounded": True,
        "recession_slope": slope,
        "direction": [float(x) for x in d],
        "f_along_ray": along,
    }
    note = (
        f"robust loss (label_smoothing={eps:g}) on a log-linear policy is unbounded below: along the "
        f"certified direction d the objective falls by {-slope:.3g} per unit step without limit "
        f"(the −ε/(1−2ε)·βh reward outgrows the logistic penalty), so there is no minimizer, no f★ and "
        "no optimality gap"
    )
    return Solution(None, None, None, int(getattr(res, "nit", 0) or 0), False, "recession_lp", cert, note)
