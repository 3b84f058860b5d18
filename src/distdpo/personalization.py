"""What the shared model costs each user: held-out accuracy of the global model against each client's own optimum.

Client i's own optimum θ_i★ minimizes its own loss f_i (a Newton solve on its pairs alone, as f★ is solved on
the pooled ones). Its personalization gap is acc_i(θ_i★) − acc_i(θ̄): the held-out preference accuracy it would
gain with a model of its own. The logistic (sigmoid) loss has no finite minimizer on a client whose pairs are
(quasi-)separable — a direction raises some margins and lowers none — which is common when a client holds few
pairs for many features; such clients are found by a linear program and left out of the gap, and counted.
"""

from __future__ import annotations

import warnings
import weakref

import torch

from distdpo.solver import solve_centralized

_OPTIMA: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # task → every client's θ_i★ (None: none exists)


def separable(margins: torch.Tensor) -> bool:
    """Whether a direction d with every margin change A d ≥ 0 and some > 0 exists (max 1ᵀAd over |d| ≤ 1 > 0)."""
    import numpy as np
    from scipy.optimize import linprog

    A = margins.to(torch.float64).numpy()
    scale = float(np.abs(A).sum()) or 1.0
    res = linprog(-A.sum(0), A_ub=-A, b_ub=np.zeros(len(A)), bounds=[(-1.0, 1.0)] * A.shape[1], method="highs")
    return res.status == 0 and -res.fun > 1e-9 * scale


def _may_lack_minimizer(task) -> bool:
    """Whether the loss can lack a finite minimizer on separable pairs: the plain logistic loss can."""
    return task.loss_type in ("sigmoid", "robust") and task.label_smoothing == 0


def own_optima(task) -> list[torch.Tensor | None]:
    """θ_i★ of every client (None where f_i has no certified minimizer), solved once per task."""
    if task not in _OPTIMA:
        one = torch.ones(1, dtype=torch.float64)
        optima = []
        for i in range(task.num_clients):
            client = task.client(i)
            if _may_lack_minimizer(task) and separable(client.margin_features(one)[0]):
                optima.append(None)
                continue
            with warnings.catch_warnings():  # a client without a certified optimum is counted, not warned about
                warnings.simplefilter("ignore")
                solution = solve_centralized(client, one)
            optima.append(solution.theta if solution.converged else None)
        _OPTIMA[task] = optima
    return _OPTIMA[task]


def personalization_gap(task, theta: torch.Tensor) -> dict | None:
    """Mean and worst (largest) acc_i(θ_i★) − acc_i(θ) over the clients with an own optimum and held-out pairs;
    None for a task without exact per-client optima (a non-convex policy)."""
    if not getattr(task, "convex", False) or not hasattr(task, "client"):
        return None
    optima = own_optima(task)
    theta = theta.detach().to(torch.float64).cpu()
    rows = torch.stack([theta if t is None else t.to(torch.float64) for t in optima])
    shared = task.held_out_accuracies(theta.expand(len(optima), -1))
    own = task.held_out_accuracies(rows)
    counted = [i for i, t in enumerate(optima) if t is not None and not shared[i].isnan()]
    gap = own - shared
    out = {
        "mean": None,
        "worst": None,
        "worst_client": None,
        "clients": len(counted),
        "clients_without_optimum": sum(t is None for t in optima),
        "clients_without_held_out": int(shared.isnan().sum()),
    }
    if counted:
        worst = max(counted, key=lambda i: float(gap[i]))
        out.update(
            mean=float(gap[counted].mean()),
            worst=float(gap[worst]),
            worst_client=task.client_names[worst],
            shared_accuracy=float(shared[counted].mean()),
            own_accuracy=float(own[counted].mean()),
            per_client={task.client_names[i]: float(gap[i]) for i in counted},
        )
    return out


__all__ = ["own_optima", "personalization_gap", "separable"]
