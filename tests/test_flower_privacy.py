"""Engine 'flower' privacy: SecAgg+ secure aggregation, and the (ε, δ) that client-level DP spends."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("flwr", reason="flwr is not installed (pip install -e '.[flower]')")

from helpers import make_config  # noqa: E402

from distdpo.config import ConfigError, from_dict  # noqa: E402
from distdpo.engines.flower import privacy  # noqa: E402
from distdpo.experiment import Cache, run_one  # noqa: E402


def _flower(cfg, **engine):
    return from_dict(
        {k: v for k, v in cfg.to_dict().items() if k != "sweep"},
        [("engine.name", "flower"), *((f"engine.{k}", v) for k, v in engine.items())],
    )


def test_accountant_matches_the_gaussian_mechanism_closed_form():
    """q = 1: T Gaussian mechanisms of multiplier σ have RDP ε(α) = T·α/(2σ²); Balle et al.'s conversion
    ε = min_α ε(α) + log((α−1)/α) − (log δ + log α)/(α−1), over opacus's orders and over all α > 1."""
    pytest.importorskip("opacus")
    from scipy.optimize import minimize_scalar

    sigma, rounds, delta = 1.3, 20, 1e-5

    def closed(alpha):
        return (
            rounds * alpha / (2 * sigma**2)
            + math.log((alpha - 1) / alpha)
            - (math.log(delta) + math.log(alpha)) / (alpha - 1)
        )

    eps = privacy.epsilon(sigma, 1.0, rounds, delta)
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))  # opacus's RDPAccountant.DEFAULT_ALPHAS
    assert eps == pytest.approx(min(closed(a) for a in orders), rel=1e-12)
    best = minimize_scalar(closed, bounds=(1.001, 200), method="bounded").fun
    assert best <= eps <= best * 1.01  # the orders' grid costs under 1%
    # Fewer rounds, more noise, a smaller sampling rate: less privacy spent; no noise: none kept.
    assert privacy.epsilon(sigma, 1.0, rounds // 2, delta) < eps
    assert privacy.epsilon(2 * sigma, 1.0, rounds, delta) < eps
    assert privacy.epsilon(sigma, 0.25, rounds, delta) < eps
    assert privacy.epsilon(0.0, 1.0, rounds, delta) == math.inf and privacy.epsilon(sigma, 1.0, 0, delta) == 0


def test_noise_multiplier_counts_a_clients_largest_weight():
    # Uniform weights over the S sampled: Flower's σ·C/S is σ times one client's sensitivity C/S.
    assert privacy.noise_multiplier(1.5, torch.ones(10), 4, 4) == pytest.approx(1.5)
    # Only 2 of the 4 need reply (engine.min_clients): a reply can weigh 1/2, the noise was set for 1/4.
    assert privacy.noise_multiplier(1.5, torch.ones(10), 4, 2) == pytest.approx(1.5 * 2 / 4)
    # Weights ∝ |D_i|: the biggest client beside the 3 smallest others.
    sizes = torch.tensor([10.0, 20.0, 30.0, 100.0, 40.0])
    assert privacy.noise_multiplier(1.5, sizes, 4, 4) == pytest.approx(1.5 / (4 * 100 / 160))


def test_flower_refuses_secure_aggregation_where_it_cannot_apply():
    with pytest.raises(ConfigError, match="SCAFFOLD"):
        _flower(make_config(algorithm={"name": "scaffold"}), secure_aggregation=True)
    with pytest.raises(ConfigError, match="dp_side = 'client'"):
        _flower(make_config(), secure_aggregation=True, dp_clip=1.0)
    with pytest.raises(ConfigError, match="other than 1"):
        _flower(make_config(algorithm={"clients_per_round": 1}), secure_aggregation=True)
    with pytest.raises(ConfigError, match="min_clients = 3 exceeds algorithm.clients_per_round = 2"):
        _flower(make_config(algorithm={"clients_per_round": 2}), min_clients=3)
    _flower(make_config(), secure_aggregation=True, dp_clip=1.0, dp_side="client")  # distributed DP: fine


def assert_within_quantization(plain_dir: Path, secure_dir: Path, sizes: list[float]) -> None:
    """The round-1 global models of a run and its SecAgg+ twin (from their checkpoints) differ by at most SecAgg+'s
    quantization error, S·(2·CLIP/QUANTIZATION)/Σ_i (w_i/max_weight) per coordinate, plus float32 rounding; and the
    masking did take place (the models are not bit-equal)."""
    from safetensors.torch import load_file

    from distdpo.engines.flower.secure import quantization_error

    plain, secure = (
        load_file(d / "run" / "r000001-rank0.safetensors")["theta"].double() for d in (plain_dir, secure_dir)
    )
    bound = quantization_error(sizes, max(sizes)) + 1e-6 * (1 + plain.abs().max().item())
    assert 0 < (secure - plain).abs().max().item() <= bound


@pytest.mark.slow
def test_secure_aggregation_gives_fedavg_within_its_quantization(tmp_path):
    """One FedAvg round of 4 unequal clients through SecAgg+ in Flower's simulation, against the simulator."""

    def run(where, **engine):
        cfg = make_config(
            data={"num_clients": 4, "size_skew": 0.5},
            algorithm={"name": "fedavg", "rounds": 1},
            engine={"flower_cpus": 2, "checkpoint_every": 1, "checkpoint_dir": str(where), **engine},
        )
        run_one(cfg, "run", Cache(), progress=False)
        return Cache().task(cfg).client_sizes.double().tolist()

    sizes = run(tmp_path / "plain")
    run(tmp_path / "secure", name="flower", secure_aggregation=True)
    assert_within_quantization(tmp_path / "plain", tmp_path / "secure", sizes)


@pytest.mark.slow
def test_dp_run_reports_epsilon_every_round():
    cfg = make_config(
        data={"num_clients": 4},
        algorithm={"name": "fedavg", "rounds": 2, "clients_per_round": 2, "aggregation": "uniform"},
        engine={"flower_cpus": 2},
    )
    rows, summary = run_one(_flower(cfg, dp_clip=1.0, dp_noise=0.8, dp_delta=1e-6), "run", Cache(), progress=False)
    expected = [privacy.epsilon(0.8, 0.5, r, 1e-6) for r in (1, 2)]
    assert math.isnan(rows[0]["dp_epsilon"]) and [r["dp_epsilon"] for r in rows[1:]] == pytest.approx(expected)
    assert summary["final"]["dp_epsilon"] == pytest.approx(expected[-1])
    assert summary["privacy"] | {"epsilon": None} == {
        "epsilon": None,
        "delta": 1e-6,
        "rounds": 2,
        "noise_multiplier": 0.8,
        "sample_rate": 0.5,
        "accountant": "opacus RDPAccountant (sampled Gaussian mechanism, one step per round)",
    }
    assert np.isfinite(summary["privacy"]["epsilon"]) and summary["privacy"]["epsilon"] == pytest.approx(expected[-1])
