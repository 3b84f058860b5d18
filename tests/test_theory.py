"""The theory module against direct computations: L, the Hessian's top eigenvalue, ζ², σ², spectral gaps."""

import math

import numpy as np
import pytest
import torch
from helpers import make_config

from distdpo import build, theory
from distdpo.losses import margin_loss
from distdpo.solver import solve_centralized
from distdpo.topology import make_topology


def _task(**policy):
    cfg = make_config(
        data={"heterogeneity": 2.0, "size_skew": 0.5}, policy=policy, engine={"dtype": "float64", "progress": False}
    )
    task = build.build_task(cfg)
    return task, build.client_weights(cfg, task.client_sizes)


def _thetas(task, weights):
    star = solve_centralized(task, weights).theta
    g = torch.Generator().manual_seed(3)
    return [
        star,
        task.initial_params().to(torch.float64),
        star + torch.randn(task.num_params, generator=g, dtype=torch.float64),
    ]


@pytest.mark.parametrize(
    "policy", [{"beta": 1.0}, {"beta": 0.4, "label_smoothing": 0.2}, {"beta": 2.0, "loss_type": "ipo"}]
)
def test_smoothness_bound_dominates_power_iteration_which_matches_eigvalsh(policy):
    task, w = _task(**policy)
    L = theory.smoothness_bound(task, w)
    for theta in _thetas(task, w):
        exact = float(theory.hessian_eigenvalues(task, w, theta)[-1])
        H = torch.autograd.functional.hessian(lambda t: task.objective(t, w), theta)
        assert exact == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-10)
        power = theory.hessian_top_eigenvalue(task, w, theta, iters=300, tol=1e-12)
        assert power <= exact * (1 + 1e-9)  # a Rayleigh quotient never exceeds λ_max
        assert power == pytest.approx(exact, rel=2e-3)
        assert L >= exact * (1 - 1e-12)
    if policy.get("loss_type") == "ipo":  # quadratic loss: the bound is the Hessian itself
        assert L == pytest.approx(exact, rel=1e-10)


def test_smoothness_bound_is_the_closed_form():
    task, w = _task(beta=0.7)
    z = task._pairs64
    M = torch.zeros(task.num_params, task.num_params, dtype=torch.float64)
    for i in range(task.num_clients):  # a direct loop over clients and their pairs
        Ni = int(task.client_sizes[i])
        for j in range(Ni):
            M += w[i] / Ni * torch.outer(z[i, j], z[i, j])
    assert theory.smoothness_bound(task, w) == pytest.approx(
        0.7**2 / 4 * float(torch.linalg.eigvalsh(M)[-1]), rel=1e-10
    )
    hinge, wh = _task(loss_type="hinge")
    assert theory.smoothness_bound(hinge, wh) is None
    mlp, wm = _task(kind="mlp", hidden_size=3)
    assert theory.smoothness_bound(mlp, wm) is None


def test_heterogeneity_and_noise_match_a_per_client_loop():
    task, w = _task(beta=0.8)
    theta = _thetas(task, w)[2]
    grads, per_pair = [], []
    for i in range(task.num_clients):
        Ni = int(task.client_sizes[i])
        z = task._pairs64[i, :Ni]
        ref = task._ref_log_odds64[i, :Ni]
        gi = []
        for j in range(Ni):
            t = theta.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(margin_loss(t @ z[j] - ref[j], 0.8), t)
            gi.append(g)
        gi = torch.stack(gi)
        grads.append(gi.mean(0))
        per_pair.append(((gi - gi.mean(0)) ** 2).sum(1).mean())
    grads = torch.stack(grads)
    full = w @ grads
    zeta2 = float(((grads - full) ** 2).sum(1).mean())
    assert theory.heterogeneity(task, w, theta) == pytest.approx(zeta2, rel=1e-9)
    assert theory.grad_noise(task, theta) == pytest.approx(float(torch.stack(per_pair).mean()), rel=1e-9)


@pytest.mark.parametrize(
    "graph, n",
    [("ring", 9), ("path", 6), ("star", 7), ("torus", 12), ("exponential", 10), ("complete", 5), ("erdos_renyi", 12)],
)
def test_spectral_gap_matches_numpy_eig(graph, n):
    topo = make_topology(graph, n, seed=1, er_p=0.6 if graph == "erdos_renyi" else None)
    ev = np.sort(np.linalg.eig(topo.W)[0].real)
    assert theory.spectral_gap(topo) == pytest.approx(1 - max(abs(ev[-2]), abs(ev[0])), abs=1e-10)
    if graph == "ring":  # Metropolis weights 1/3 on a ring: λ_2 = 1/3 + 2/3 cos(2π/n)
        assert theory.spectral_gap(topo) == pytest.approx(1 - (1 / 3 + 2 / 3 * math.cos(2 * math.pi / n)), abs=1e-12)


def test_rate_forms():
    assert theory.fedavg_floor(0.5, 1, zeta2=1.0) == 0.0  # full-batch E = 1 is gradient descent
    assert theory.fedavg_floor(0.5, 5, zeta2=1.0) == pytest.approx(4 * theory.fedavg_floor(0.5, 3, zeta2=1.0))
    assert theory.partial_participation_floor(0.5, 1.0, 8, 8) == 0.0
    assert theory.partial_participation_floor(0.5, 1.0, 1, 8) > theory.partial_participation_floor(0.5, 1.0, 4, 8)
    assert theory.staleness_floor(0.5, 0, 1.0, batch_size=8) == 0.0
    assert theory.staleness_floor(0.5, 4, 1.0, batch_size=8) == pytest.approx(
        2 * theory.staleness_floor(0.5, 2, 1.0, batch_size=8)
    )
    ring, complete = make_topology("ring", 8), make_topology("complete", 8)
    # complete graph: every non-consensus eigenvalue is 0, up to eigvalsh's rounding of n·ε each
    assert theory.dsgd_consensus_spectral(0.5, 1.0, complete.W) <= 0.5**2 * (8 * np.finfo(float).eps) ** 2
    lam = 1 - theory.spectral_gap(ring)
    assert theory.dsgd_consensus_spectral(0.5, 1.0, ring.W) <= theory.dsgd_consensus_bound(0.5, 1.0, lam)
    assert theory.dsgd_consensus_codebase(0.5, 1.0, lam) == pytest.approx(0.25 / (1 - lam**2))
    assert theory.rounds_to_eps(0.1) == pytest.approx(2 * theory.rounds_to_eps(0.2))


def test_instance_summary():
    task, w = _task()
    star = solve_centralized(task, w).theta
    inst = theory.instance(task, w, star)
    assert inst["L_bound"] >= inst["L_eig_at_theta_star"] >= inst["mu_at_theta_star"] > 0
    assert inst["L_power_at_theta_star"] == pytest.approx(inst["L_eig_at_theta_star"], rel=1e-3)
    assert inst["heterogeneity_at_theta_star"] > 0 and inst["grad_noise"] > 0


@pytest.mark.parametrize("policy", [{"beta": 1.0}, {"kind": "mlp", "hidden_size": 3}])
def test_finite_difference_power_iteration_matches_eigvalsh(policy):
    task, w = _task(**policy)

    def grad(theta):
        t = theta.clone().requires_grad_(True)
        return torch.autograd.grad(task.objective(t, w), t)[0]

    g = torch.Generator().manual_seed(4)
    for theta in (
        task.initial_params().to(torch.float64),
        torch.randn(task.num_params, generator=g, dtype=torch.float64),
    ):
        eig = theory.hessian_eigenvalues(task, w, theta)
        largest = float(eig[eig.abs().argmax()])  # power iteration finds the eigenvalue largest in modulus
        fd, _ = theory.hessian_top_eigenpair_fd(grad, theta, iters=500, tol=1e-12, eps=1e-4)
        assert fd == pytest.approx(largest, rel=5e-3)
