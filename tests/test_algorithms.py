"""Algorithms against independent computations and closed forms."""

import numpy as np
import pytest
import torch
from helpers import make_config

from distdpo import build
from distdpo.algorithms.federated import sample_clients
from distdpo.algorithms.optim import ClientOptimizer
from distdpo.engines.simulation import SimulatedCommunicator
from distdpo.experiment import run_one


def setup(cfg):
    task = build.build_task(cfg)
    weights = build.client_weights(cfg, task.client_sizes)
    topo = build.build_topology(cfg)
    comm = SimulatedCommunicator(task.num_clients, topo, dtype=build.torch_dtype(cfg))
    return task, weights, build.build_algorithm(cfg, task, comm, topo, weights)


def numpy_pooled_gradient(task):
    """θ ↦ ∇ of the pooled log-linear DPO loss (every pair weighted alike), written independently in numpy."""
    d = task.data
    n, N = d.chosen.shape
    rows, cols = np.arange(n)[:, None], np.arange(N)[None, :]
    feats = d.features.numpy()
    z = (feats[rows, cols, d.chosen.numpy()] - feats[rows, cols, d.rejected.numpy()]).reshape(-1, feats.shape[-1])
    beta, ref = task.beta, d.theta_ref.numpy()

    def gradient(theta):
        h = z @ (theta - ref)
        return (-(beta / (1 + np.exp(beta * h)))[:, None] * z).mean(0)  # d/dθ softplus(−βh)

    return gradient


def numpy_gradient_descent(task, lr, steps):
    """Centralized GD on the pooled log-linear DPO loss, written independently in numpy."""
    gradient = numpy_pooled_gradient(task)
    theta, out = task.data.theta_ref.numpy().copy(), []
    for _ in range(steps):
        theta = theta - lr * gradient(theta)
        out.append(theta.copy())
    return out


FULL = {"batch_size": "full", "local_steps": 1, "lr": 0.5, "rounds": 6}


def test_fedavg_k1_full_participation_is_centralized_gradient_descent():
    cfg = make_config(algorithm={**FULL, "name": "fedavg"}, engine={"dtype": "float64", "progress": False})
    task, _, algo = setup(cfg)
    expected = numpy_gradient_descent(task, 0.5, 6)
    for t in range(6):
        algo.run_round(t)
        np.testing.assert_allclose(algo.global_params().numpy(), expected[t], rtol=1e-10, atol=1e-12)


def test_centralized_algorithm_is_gradient_descent():
    cfg = make_config(algorithm={**FULL, "name": "centralized"}, engine={"dtype": "float64", "progress": False})
    task, _, algo = setup(cfg)
    expected = numpy_gradient_descent(task, 0.5, 6)
    for t in range(6):
        algo.run_round(t)
        np.testing.assert_allclose(algo.global_params().numpy(), expected[t], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("gossip", ["atc", "cta"])
def test_dsgd_on_complete_graph_keeps_every_node_on_the_gd_iterate(gossip):
    cfg = make_config(
        algorithm={**FULL, "name": "dsgd", "gossip": gossip},
        topology={"graph": "complete"},
        engine={"dtype": "float64", "progress": False},
    )
    task, _, algo = setup(cfg)
    expected = numpy_gradient_descent(task, 0.5, 6)
    for t in range(6):
        algo.run_round(t)
        # ATC: every node equals the GD iterate. CTA: nodes step from the exact average, so their mean does.
        rows = algo.X.numpy() if gossip == "atc" else algo.global_params().numpy()[None]
        for row in rows:
            np.testing.assert_allclose(row, expected[t], rtol=1e-10, atol=1e-12)


def final(cfg, label="run"):
    rows, summary = run_one(cfg, label, progress=False)
    return rows[-1], summary


HETERO = {"heterogeneity": 4.0, "num_clients": 8, "pairs_per_client": 80}


def test_scaffold_beats_fedavg_at_high_heterogeneity():
    common = {"batch_size": "full", "local_steps": 10, "lr": 0.3, "rounds": 40}
    fedavg, _ = final(make_config(data=HETERO, algorithm={**common, "name": "fedavg"}))
    scaffold, _ = final(make_config(data=HETERO, algorithm={**common, "name": "scaffold"}))
    assert scaffold["optimality_gap"] < 0.1 * fedavg["optimality_gap"]
    assert scaffold["optimality_gap"] < 1e-6


def test_gradient_tracking_beats_dsgd_at_high_heterogeneity():
    common = {"batch_size": "full", "local_steps": 1, "lr": 0.5, "rounds": 300}
    dsgd, _ = final(make_config(data=HETERO, algorithm={**common, "name": "dsgd"}, topology={"graph": "ring"}))
    gt, _ = final(
        make_config(data=HETERO, algorithm={**common, "name": "gradient_tracking"}, topology={"graph": "ring"})
    )
    assert gt["optimality_gap"] < 0.01 * dsgd["optimality_gap"]
    assert gt["consensus_distance"] < 0.01 * dsgd["consensus_distance"]


def test_consensus_distance_ordered_by_connectivity():
    common = {"batch_size": "full", "local_steps": 1, "lr": 0.5, "rounds": 60, "name": "dsgd"}
    data = {**HETERO, "num_clients": 16}
    xi = {
        g: final(make_config(data=data, algorithm=common, topology={"graph": g}))[0]["consensus_distance"]
        for g in ("ring", "torus", "complete")
    }
    assert xi["ring"] > xi["torus"] > xi["complete"]
    # The complete graph with uniform W averages exactly: what remains is the rounding of one float32 mean of n rows
    # per coordinate, at most n·ε·‖θ‖∞ each, whatever order a CPU sums in.
    task, _, algo = setup(make_config(data=data, algorithm=common, topology={"graph": "complete"}))
    for r in range(common["rounds"]):
        algo.run_round(r)
    theta = algo.global_params().double()
    rounding = task.num_params * (data["num_clients"] * torch.finfo(torch.float32).eps * theta.abs().max()) ** 2
    assert xi["complete"] <= rounding < 1e-6 * xi["torus"]


def test_staleness_changes_the_trajectory():
    common = {"name": "fedavg", "rounds": 12, "lr": 0.3}
    gaps = {q: final(make_config(algorithm={**common, "staleness": q}))[0]["optimality_gap"] for q in (0, 2, 5)}
    assert len({round(v, 12) for v in gaps.values()}) == 3


def test_client_sampling_is_seeded_without_replacement():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, b = sample_clients(g1, 50, 7), sample_clients(g2, 50, 7)
    assert torch.equal(a, b) and len(set(a.tolist())) == 7 and a.max() < 50


def test_partial_participation_only_uses_sampled_clients():
    cfg = make_config(algorithm={"name": "fedavg", "clients_per_round": 3, "rounds": 1})
    sampled = sample_clients(torch.Generator().manual_seed(cfg.seed + 2), 8, 3).tolist()  # Federated's sampling stream
    others = [i for i in range(8) if i not in sampled]

    def one_round(corrupt):
        task, _, algo = setup(cfg)
        pairs = task.pairs_flat.view(8, -1, *task.pairs_flat.shape[1:])
        pairs[corrupt] *= -3.0  # change what these clients' data say
        stats = algo.run_round(0)
        return algo.global_params(), stats

    base, stats = one_round([])
    assert stats["bytes"] == 2 * 3 * base.numel() * 4
    assert torch.equal(one_round(others)[0], base)  # unsampled clients' data play no part
    assert not torch.allclose(one_round(sampled[:1])[0], base)  # a sampled client's data do


@pytest.mark.parametrize("name", ["fedavg", "scaffold", "dsgd", "gradient_tracking"])
def test_bytes_count_what_travels_at_the_engine_dtype(name):
    """float32 runs send 4 bytes a parameter, float64 runs 8: the count follows the dtype, per the README."""
    counts = {}
    for dtype, size in (("float32", 4), ("float64", 8)):
        cfg = make_config(algorithm={"name": name, "rounds": 1, "clients_per_round": 0}, engine={"dtype": dtype})
        task, _, algo = setup(cfg)
        topology = build.build_topology(cfg)
        p = task.num_params
        # federated: model down + update up per client (SCAFFOLD: c − c_i down too); gossip: a row per directed edge
        vectors = {"fedavg": 2, "scaffold": 3, "dsgd": 1, "gradient_tracking": 2}[name]
        per_vector = 8 * p if topology is None else topology.messages_per_round(0) * p
        counts[dtype] = algo.run_round(0)["bytes"]
        assert counts[dtype] == vectors * per_vector * size
    assert counts["float64"] == 2 * counts["float32"]


@pytest.mark.parametrize("name", ["fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_variants_train_and_differ_from_fedavg(name):
    base, _ = final(make_config(algorithm={"name": "fedavg", "rounds": 15}))
    other, _ = final(
        make_config(
            algorithm={
                "name": name,
                "rounds": 15,
                "server_lr": 0.1 if "ada" in name or "yogi" in name else 1.0,
                "mu": 0.5,
            }
        )
    )
    assert other["global_loss"] < 0.69  # learned something from ln 2 at the reference policy
    assert other["global_loss"] != base["global_loss"]


def test_adamw_matches_torch_reference():
    torch.manual_seed(0)
    X = torch.randn(3, 5, dtype=torch.float64)
    grads = [torch.randn(3, 5, dtype=torch.float64) for _ in range(4)]
    opt = ClientOptimizer("adamw", lr=0.01, weight_decay=0.1)
    state, Y = opt.init_state(X), X
    for g in grads:
        Y = opt.step(Y, g, state)
    for row in range(3):
        p = torch.nn.Parameter(X[row].clone())
        ref = torch.optim.AdamW([p], lr=0.01, weight_decay=0.1)
        for g in grads:
            p.grad = g[row].clone()
            ref.step()
        torch.testing.assert_close(Y[row], p.detach())


def test_mlp_policy_trains():
    row, summary = final(make_config(policy={"kind": "mlp", "hidden_size": 8}, algorithm={"rounds": 20}))
    assert summary["f_star"] is None and np.isnan(row["optimality_gap"])
    assert row["global_loss"] < 0.69
