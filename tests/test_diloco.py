"""DiLoCo's pieces: the outer Nesterov step and clients' optimizer state kept across rounds, against independent
re-implementations."""

import numpy as np
import torch
from helpers import make_config
from test_algorithms import numpy_pooled_gradient, setup


def test_nesterov_outer_step_matches_numpy():
    """K = 1, full batch, every client: Δ = −η ∇f(θ); v ← μv + Δ, θ ← θ + η_g (Δ + μv) (PyTorch's Nesterov SGD
    on the pseudo-gradient −Δ), with DiLoCo's η_g = 0.7, μ = 0.9."""
    cfg = make_config(
        algorithm={
            "name": "fedavg",
            "batch_size": "full",
            "local_steps": 1,
            "lr": 0.5,
            "server_optimizer": "nesterov",
            "server_lr": 0.7,
            "server_momentum": 0.9,
        },
        engine={"dtype": "float64"},
    )
    task, _, algo = setup(cfg)
    gradient = numpy_pooled_gradient(task)
    theta = task.data.theta_ref.numpy().copy()
    v = np.zeros_like(theta)
    for t in range(6):
        delta = -0.5 * gradient(theta)
        v = 0.9 * v + delta
        theta = theta + 0.7 * (delta + 0.9 * v)
        algo.run_round(t)
        np.testing.assert_allclose(algo.global_params().numpy(), theta, rtol=1e-10, atol=1e-12)
    # the same step as torch.optim.SGD(nesterov=True) on the pseudo-gradient
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    ref = torch.optim.SGD([p], lr=0.7, momentum=0.9, nesterov=True)
    from distdpo.algorithms.optim import ServerOptimizer

    ours, theta_ours = ServerOptimizer("nesterov", 0.7, 0.9), torch.zeros(3, dtype=torch.float64)
    for step in range(4):
        delta = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) / (step + 1)
        p.grad = -delta
        ref.step()
        theta_ours = ours.step(theta_ours, delta)
    torch.testing.assert_close(theta_ours, p.detach())


def test_kept_client_adamw_state_continues_across_rounds():
    """Each client's AdamW (torch.optim.AdamW, one per client, never reset) restarts from the global model every
    round; the server averages."""
    rounds, K, lr = 3, 2, 0.05
    cfg = make_config(
        algorithm={
            "name": "fedavg",
            "batch_size": "full",
            "local_steps": K,
            "lr": lr,
            "optimizer": "adamw",
            "weight_decay": 0.01,
            "keep_client_optimizer_state": True,
            "rounds": rounds,
        },
        engine={"dtype": "float64"},
    )
    task, weights, algo = setup(cfg)
    n = task.num_clients
    batch = task.sample_batch(torch.Generator(), None)
    params = [torch.nn.Parameter(task.initial_params().double().clone()) for _ in range(n)]
    opts = [torch.optim.AdamW([q], lr=lr, weight_decay=0.01) for q in params]
    theta = task.initial_params().double()
    for t in range(rounds):
        for i, (q, opt) in enumerate(zip(params, opts)):
            q.data.copy_(theta)
            for _ in range(K):
                _, g = task.loss_and_grad(q.detach()[None], torch.tensor([i]), batch)
                q.grad = g[0].clone()
                opt.step()
        theta = sum(w * q.detach() for w, q in zip(weights.tolist(), params))
        algo.run_round(t)
        torch.testing.assert_close(algo.global_params(), theta, rtol=1e-10, atol=1e-12)
    assert algo.opt_state["t"].flatten().tolist() == [rounds * K] * n
