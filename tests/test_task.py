"""The synthetic model, the policies and the stacked task against finite differences and direct loops."""

import math

import numpy as np
import pytest
import scipy.optimize
import torch
from helpers import make_config

from distdpo import build
from distdpo.data.synthetic import make_synthetic
from distdpo.policies import LogLinearPolicy, MLPPolicy
from distdpo.solver import solve_centralized


def test_synthetic_ground_truth():
    d = make_synthetic(num_clients=5, pairs_per_client=30, dim=4, heterogeneity=0.7, size_skew=0.8, seed=1)
    assert torch.allclose(d.theta_users.mean(0), d.theta_star)
    assert d.sizes.min() >= 2 and len(set(d.sizes.tolist())) > 1
    assert (d.chosen != d.rejected).all()
    same = make_synthetic(num_clients=5, dim=4, heterogeneity=0.0, seed=1)
    assert torch.allclose(same.theta_users, same.theta_star.expand(5, -1))


def test_labels_follow_the_users_true_rewards():
    clean = make_synthetic(num_clients=4, pairs_per_client=500, dim=4, reward_scale=30.0, seed=2)
    assert clean.eval_true_order.float().mean() > 0.95  # strong rewards: BT labels almost always right
    noisy = make_synthetic(num_clients=4, pairs_per_client=500, dim=4, reward_scale=30.0, label_noise=0.3, seed=2)
    assert 0.6 < noisy.eval_true_order.float().mean() < 0.8


@pytest.mark.parametrize("kind", ["loglinear", "mlp"])
def test_gradient_matches_finite_differences(kind):
    cfg = make_config(
        policy={"kind": kind, "hidden_size": 5, "beta": 0.7}, engine={"dtype": "float64", "progress": False}
    )
    task = build.build_task(cfg)
    g = torch.Generator().manual_seed(0)
    X = task.initial_params().expand(3, -1) + 0.3 * torch.randn(3, task.num_params, generator=g, dtype=torch.float64)
    nodes = torch.tensor([0, 4, 7])
    batch = task.sample_batch(torch.Generator().manual_seed(1), 16)
    loss, grad = task.loss_and_grad(X, nodes, batch)
    eps = 1e-6
    for row in range(3):
        for j in range(0, task.num_params, max(1, task.num_params // 8)):
            E = torch.zeros_like(X)
            E[row, j] = eps
            up, _ = task.loss_and_grad(X + E, nodes, batch)
            down, _ = task.loss_and_grad(X - E, nodes, batch)
            assert grad[row, j].item() == pytest.approx(((up - down)[row] / (2 * eps)).item(), rel=1e-6, abs=1e-9)
            assert torch.allclose(
                (up - down)[torch.arange(3) != row], torch.zeros(2, dtype=torch.float64)
            )  # rows independent


def test_loglinear_log_odds_and_normalization():
    pol = LogLinearPolicy(3)
    X = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)
    feats = torch.randn(1, 4, 5, 3, dtype=torch.float64)
    all_logps = torch.stack([pol.logps(X, feats, torch.full((1, 4), a)) for a in range(5)], -1)
    assert torch.allclose(all_logps.exp().sum(-1), torch.ones(1, 4, dtype=torch.float64))
    w, l = feats[:, :, 0], feats[:, :, 3]
    assert torch.allclose(pol.log_odds(X, pol.pair_inputs(w, l)), (w - l) @ X[0])
    mlp = MLPPolicy(3, 4)
    P = mlp.init_params(torch.Generator().manual_seed(0))[None]
    direct = mlp.logps(P, feats, torch.zeros(1, 4, dtype=torch.long)) - mlp.logps(P, feats, torch.full((1, 4), 3))
    assert torch.allclose(mlp.log_odds(P, mlp.pair_inputs(w, l)), direct)


def test_loss_at_reference_is_ln2():
    task = build.build_task(make_config())
    m = task.evaluate(task.initial_params(), torch.full((8,), 1 / 8, dtype=torch.float64))
    assert m["global_loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert m["reward_margin"] == pytest.approx(0.0, abs=1e-7)


def test_solver_matches_scipy_on_independent_numpy_loss():
    cfg = make_config(data={"label_noise": 0.1})
    task = build.build_task(cfg)
    w = build.client_weights(cfg, task.client_sizes)
    sol = solve_centralized(task, w)
    d = task.data
    n, N = d.chosen.shape
    r, c = np.arange(n)[:, None], np.arange(N)[None, :]
    feats = d.features.numpy()
    z = (feats[r, c, d.chosen.numpy()] - feats[r, c, d.rejected.numpy()]).reshape(-1, feats.shape[-1])
    beta, ref = task.beta, d.theta_ref.numpy()

    def f(theta):
        h = beta * (z @ (theta - ref))
        return np.logaddexp(0, -h).mean(), -(beta / (1 + np.exp(h)))[:, None].__mul__(z).mean(0)

    res = scipy.optimize.minimize(
        f, ref, jac=True, method="L-BFGS-B", options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 10000}
    )
    assert sol.converged
    assert sol.f_star == pytest.approx(res.fun, abs=1e-10)
    np.testing.assert_allclose(sol.theta.numpy(), res.x, atol=1e-5)


def test_heterogeneity_and_grad_noise_against_direct_loops():
    cfg = make_config(data={"heterogeneity": 2.0, "size_skew": 0.5})
    task = build.build_task(cfg)
    w = build.client_weights(cfg, task.client_sizes)
    theta = task.initial_params().to(torch.float64) + 0.1
    zeta2 = task.evaluate(theta, w)["heterogeneity"]
    sigma2 = task.grad_noise(theta)
    grads, variances = [], []
    for i in range(task.num_clients):  # one client, one pair at a time
        Ni = int(task.client_sizes[i])
        per_pair = []
        for j in range(Ni):
            b = type(task.sample_batch(torch.Generator(), 1))(
                torch.tensor([[j]]), torch.ones(1, 1, dtype=torch.float64)
            )
            _, g = task._loss_and_grad(
                theta[None], task._pairs64[i : i + 1, j : j + 1], task._ref_log_odds64[i : i + 1, j : j + 1], b.scale
            )
            per_pair.append(g[0])
        G = torch.stack(per_pair)
        grads.append(G.mean(0))
        variances.append(((G - G.mean(0)) ** 2).sum(1).mean())
    grads = torch.stack(grads)
    full = w @ grads
    assert zeta2 == pytest.approx(float(((grads - full) ** 2).sum(1).mean()), rel=1e-9)
    assert sigma2 == pytest.approx(float(torch.stack(variances).mean()), rel=1e-9)
    low = build.build_task(make_config(data={"heterogeneity": 0.2}))
    assert low.evaluate(theta, w)["heterogeneity"] < zeta2
