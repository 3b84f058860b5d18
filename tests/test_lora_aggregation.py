"""LoRA aggregation modes: FedIT's factor averaging, FFA-LoRA's frozen A, exact products re-factored by SVD."""

import numpy as np
import pytest
import torch
from helpers import make_config
from test_lm import hhh_texts

from distdpo.algorithms.decentralized import Decentralized
from distdpo.algorithms.federated import Federated
from distdpo.algorithms.lora import LoraFactors, aggregate_lora, check_lora_aggregation
from distdpo.algorithms.optim import ClientOptimizer, ServerOptimizer
from distdpo.config import Config, ConfigError
from distdpo.engines.simulation import SimulatedCommunicator
from distdpo.lm.builtin import build_model, train_tokenizer
from distdpo.lm.logprobs import tokenize_pairs
from distdpo.lm.policy import CausalLMPolicy
from distdpo.tasks.text import TextTask
from distdpo.topology import make_topology

OUT, IN, R = 6, 5, 2
ONE = torch.ones(1, dtype=torch.float64)
LAYOUT = [LoraFactors(slice(0, R * IN), (R, IN), slice(R * IN, R * IN + OUT * R), (OUT, R))]


def rows(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    return torch.cat([A.flatten(1), B.flatten(1)], 1).double()


def product(values, weights, layout=LAYOUT):
    f = layout[0]
    A = values[:, f.a].reshape(-1, *f.a_shape) if isinstance(f.a, slice) else f.a.expand(len(values), *f.a_shape)
    B = values[:, f.b].reshape(-1, *f.b_shape)
    return torch.einsum("s,sor,sri->oi", weights, B.double(), A.double())


def test_factor_averaging_errs_and_product_refactors_exactly_at_rank_r():
    g = torch.Generator().manual_seed(0)
    w = torch.tensor([0.3, 0.7], dtype=torch.float64)
    A, B = torch.randn(2, R, IN, generator=g), torch.randn(2, OUT, R, generator=g)
    values = rows(A, B)
    P = product(values, w)
    merged, err = aggregate_lora(values, w, LAYOUT, "factors")
    assert torch.equal(merged, w @ values)
    assert err == pytest.approx(float(torch.linalg.norm(P - product(merged[None], ONE)) / torch.linalg.norm(P)))
    assert err > 0.1
    # Product: Σ p_i B_i A_i has rank 2r here; the error is the truncated SVD's residual.
    merged, err = aggregate_lora(values, w, LAYOUT, "product")
    s = torch.linalg.svdvals(P)
    assert err == pytest.approx(float(s[R:].norm() / s.norm()), rel=1e-9)
    assert torch.linalg.norm(P - product(merged[None], ONE)) == pytest.approx(float(s[R:].norm()), rel=1e-9)
    # A shared A (rank ≤ r): the re-factored product is Σ p_i B_i A_i itself.
    values = rows(A[:1].expand(2, -1, -1), B)
    merged, err = aggregate_lora(values, w, LAYOUT, "product")
    assert err < 1e-7
    assert torch.allclose(product(merged[None], ONE), product(values, w), atol=1e-10)


def test_a_fixed_outside_the_vector_makes_factor_averaging_exact():
    g = torch.Generator().manual_seed(1)
    A0 = torch.randn(R, IN, generator=g)
    layout = [LoraFactors(A0, (R, IN), slice(0, OUT * R), (OUT, R))]
    values = torch.randn(3, OUT * R, generator=g, dtype=torch.float64)
    merged, err = aggregate_lora(values, torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64), layout, "freeze_a")
    assert err <= 1e-12 and merged.shape == (OUT * R,)


@pytest.fixture(scope="module")
def lm():
    P, C, R_ = hhh_texts(12)
    tok = train_tokenizer(P + C + R_, vocab_size=300)
    return tok, tokenize_pairs(tok, P, C, R_, max_length=48)


def text_task(lm, freeze_a: bool) -> TextTask:
    tok, pairs = lm
    model = build_model("builtin:gpt2-tiny", len(tok), seed=0)
    policy = CausalLMPolicy(model, tok, lora_r=2, lora_alpha=4, freeze_a=freeze_a)
    train = [np.arange(0, 4), np.arange(4, 8)]  # different pairs: different local updates
    held = [np.arange(8, 10), np.arange(10, 12)]
    return TextTask(policy, pairs, train, held, ["a", "b"], beta=0.1, loss_pairs_per_client=2)


def b_numel(policy) -> int:
    return sum(p.numel() for n, p in policy.model.named_parameters() if ".lora_B." in n)


def two_clients(task, mode: str, weights=(0.5, 0.5), **options) -> Federated:
    """FedAvg of the 2-client text task (K = 2, B = 2, η = 2) with LoRA aggregation ``mode``."""
    return Federated(
        task,
        SimulatedCommunicator(2),
        weights=torch.tensor(weights),
        local_steps=2,
        optimizer=ClientOptimizer("sgd", 2.0),
        server=ServerOptimizer("sgd", 1.0),
        clients_per_round=2,
        batch_size=2,
        lora_aggregation=mode,
        **options,
    )


def federated(lm, mode: str, rounds: int = 2):
    task = text_task(lm, mode == "freeze_a")
    policy = task.policy
    algo = two_clients(task, mode)
    a_start = {n: p.detach().clone() for n, p in policy.model.named_parameters() if ".lora_A." in n}
    stats = [algo.run_round(t) for t in range(rounds)]
    return algo, policy, a_start, stats


def test_freeze_a_trains_and_sends_b_only_and_aggregates_exactly(lm):
    algo, policy, a_start, stats = federated(lm, "freeze_a")
    assert all(s["lora_aggregation_error"] <= 1e-6 for s in stats)
    policy.set_flat(algo.global_params())
    for name, p in policy.model.named_parameters():
        if ".lora_A." in name:
            assert torch.equal(p, a_start[name])
    assert algo.global_params().numel() == b_numel(policy)
    assert all(
        s["bytes"] == 2 * 2 * b_numel(policy) * 4 for s in stats
    )  # S = 2 clients, model down + update up, float32
    assert algo.global_params().abs().sum() > 0  # B did move


def test_decentralized_freeze_a_gossips_b_only(lm):
    task = text_task(lm, freeze_a=True)
    topology = make_topology("path", 2)
    algo = Decentralized(
        task,
        SimulatedCommunicator(2, topology),
        topology,
        local_steps=1,
        optimizer=ClientOptimizer("sgd", 1.0),
        batch_size=2,
    )
    stats = algo.run_round(0)
    assert algo.X.shape == (2, b_numel(task.policy))
    assert stats["bytes"] == 2 * b_numel(task.policy) * 4  # one row per directed edge of the 2-node path


def test_factor_averaging_errs_on_different_clients_and_product_runs(lm):
    *_, stats = federated(lm, "factors")
    assert all(s["lora_aggregation_error"] > 0 for s in stats)
    algo, *_ = federated(lm, "product", rounds=1)
    assert algo.global_params().isfinite().all()


def test_product_of_one_client_is_its_own_adapter(lm):
    # One client's B A has rank ≤ r: the re-factored adapter gives back the same product.
    algo, policy, *_ = federated(lm, "factors", rounds=1)
    theta = algo.global_params()[None].double()
    layout = algo.lora
    merged, err = aggregate_lora(theta, ONE, layout, "product")
    assert err < 1e-6
    for f in layout:
        before = product(theta, ONE, [f])
        after = product(merged[None], ONE, [f])
        assert torch.allclose(before, after, atol=1e-9 * float(before.abs().max()) + 1e-12)


def test_non_default_modes_are_refused_without_a_lora_policy():
    with pytest.raises(ConfigError, match="lora_aggregation"):
        make_config(algorithm={"lora_aggregation": "freeze_a"})  # a log-linear policy


@pytest.mark.parametrize(
    "mode, changes",
    [
        ("freeze_a", {"policy.lora_r": 0}),
        ("product", {"algorithm.name": "dsgd"}),
        ("product", {"engine.name": "flower", "engine.secure_aggregation": True}),
        ("product", {"engine.name": "flower", "algorithm.name": "scaffold"}),
        ("product", {"engine.name": "flower", "algorithm.server_lr": 0.5}),
    ],
)
def test_non_default_modes_need_lora_a_server_and_flower_replies_it_can_see(mode, changes):
    cfg = Config()
    cfg.policy.kind, cfg.algorithm.lora_aggregation = "causal_lm", mode
    check_lora_aggregation(cfg)  # a LoRA causal LM with fedavg: fine
    for key, value in changes.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    with pytest.raises(ConfigError, match="lora_aggregation"):
        check_lora_aggregation(cfg)


def test_a_sweep_over_modes_builds_freeze_a_its_own_task(tmp_path):
    # A shared cache (a sweep, the reproduce suite) must not hand freeze_a the task whose vector holds A.
    from test_export import tiny_lm_table, write_arithmetic_pairs

    from distdpo.config import from_dict
    from distdpo.experiment import Cache, run_one

    data = tmp_path / "pairs.jsonl"
    write_arithmetic_pairs(data)
    cache, errors = Cache(), {}
    for mode in ("factors", "freeze_a"):
        table = tiny_lm_table(data)
        table["algorithm"].update(rounds=1, lora_aggregation=mode)
        rows, summary = run_one(from_dict(table), mode, cache, progress=False)
        errors[mode] = rows[-1]["lora_aggregation_error"]
        if mode == "freeze_a":
            assert summary["num_params"] == b_numel(cache.task(from_dict(table)).policy)
    assert errors["freeze_a"] <= 1e-6 < errors["factors"]
