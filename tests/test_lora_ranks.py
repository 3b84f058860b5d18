"""Clients of different LoRA ranks (HetLoRA / FlexLoRA): the rank rule, the client's cut of the global adapter, and
what a low-rank client trains and sends."""

import csv

import numpy as np
import pytest
import torch
from helpers import make_config
from test_export import tiny_lm_table, write_arithmetic_pairs
from test_lora_aggregation import lm, text_task, two_clients  # noqa: F401 (lm is a fixture)

from distdpo.algorithms.federated import Federated
from distdpo.algorithms.lora import check_lora_aggregation, client_ranks, rank_masks
from distdpo.config import Config, ConfigError, from_dict
from distdpo.experiment import run_one


def test_rank_rules():
    sizes = [10, 40, 80, 5]
    # r_i = round(8 · n_i / 80) kept within [2, 8]: 1 → 2, 4, 8, 0.5 → 2
    assert client_ranks("by_size:2-8", sizes) == [2, 4, 8, 2]
    assert client_ranks([1, 2, 2, 1], sizes) == [1, 2, 2, 1]
    assert client_ranks(8, sizes) is None and client_ranks([4, 4, 4, 4], sizes) is None  # one rank: the plain path
    with pytest.raises(ConfigError, match="lists 2 ranks, but the data has 4 clients"):
        client_ranks([1, 2], sizes)


@pytest.mark.parametrize("value", [-1, [], [0, 2], "by_size:3-2", "by_size:4", "proportional", 2.5, True])
def test_bad_rank_values_are_refused_naming_the_key(value):
    with pytest.raises(ConfigError, match="policy.lora_r must be"):
        make_config(policy={"kind": "causal_lm", "lora_r": value})


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"algorithm.name": "dsgd"}, "needs a federated algorithm"),
        ({"algorithm.lora_aggregation": "freeze_a"}, "not 'freeze_a'"),
        ({"engine.name": "flower"}, "flower engine sends every client the same adapter"),
        ({"policy.kind": "loglinear"}, "needs a LoRA policy"),
        ({"data.num_clients": 3}, "lists 8 ranks, but data.num_clients = 3"),
    ],
)
def test_per_client_ranks_need_a_server_a_trained_a_and_no_flower(changes, message):
    cfg = Config()
    cfg.policy.kind, cfg.policy.lora_r, cfg.data.num_clients = "causal_lm", [1, 2] * 4, 8
    check_lora_aggregation(cfg)  # fedavg on a LoRA causal LM: fine
    for key, value in changes.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    with pytest.raises(ConfigError, match=message):
        check_lora_aggregation(cfg)


def federated(task, mode: str, masks, scaffold: bool = False) -> Federated:
    return two_clients(task, mode, (0.4, 0.6), scaffold=scaffold, rank_masks=masks)


def dense(theta: torch.Tensor, f) -> np.ndarray:
    """B A of one module, in float64 numpy."""
    A = theta[f.a].reshape(f.a_shape).double().numpy()
    B = theta[f.b].reshape(f.b_shape).double().numpy()
    return B @ A


def test_a_low_rank_client_starts_from_the_best_rank_r_approximation(lm):  # noqa: F811
    # FlexLoRA: after `product`, the global factors are in SVD order, so client i's cut (its first r_i components)
    # is the best rank-r_i approximation of the global B A: checked against numpy's SVD of the dense product.
    task = text_task(lm, freeze_a=False)
    layout = task.lora_layout()
    masks = rank_masks(layout, task.num_params, [1, 2])
    algo = federated(task, "product", masks)
    for t in range(2):
        algo.run_round(t)
    theta = algo.global_params()
    cut = theta * masks[0]
    for f in layout:
        U, s, Vt = np.linalg.svd(dense(theta, f))
        best = s[0] * np.outer(U[:, 0], Vt[0])
        scale = s[0] * 1e-5  # float32 factors: relative rounding ~1e-7, times the few sums of a product
        assert np.abs(dense(cut, f) - best).max() <= scale
        assert s[1] > 1e-3 * s[0]  # the cut did remove something


@pytest.mark.parametrize("scaffold", [False, True])
def test_entries_no_client_holds_never_change_and_bytes_count_what_each_holds(lm, scaffold):  # noqa: F811
    # Both clients have rank 1 of the adapter's 2: B's second column (0 at the start) must stay 0 and A's second row
    # at its initial value, also under SCAFFOLD's corrections.
    task = text_task(lm, freeze_a=False)
    layout = task.lora_layout()
    masks = rank_masks(layout, task.num_params, [1, 1])
    algo = federated(task, "factors", masks, scaffold=scaffold)
    theta0 = algo.global_params().clone()
    stats = [algo.run_round(t) for t in range(2)]
    theta = algo.global_params()
    outside = masks[0] == 0
    assert torch.equal(theta[outside], theta0[outside])
    assert not torch.equal(theta[~outside], theta0[~outside])  # the rank-1 part trained
    held = sum(f.a_shape[1] + f.b_shape[0] for f in layout)  # one row of A and one column of B per module
    vectors = 3 if scaffold else 2  # model (and c − c_i) down, update up
    assert all(s["bytes"] == 2 * vectors * held * 4 for s in stats)


def test_by_size_ranks_run_and_are_reported(tmp_path):
    data = tmp_path / "pairs.jsonl"
    write_arithmetic_pairs(data)
    table = tiny_lm_table(data)
    table["policy"]["lora_r"] = "by_size:1-4"
    table["data"].update(partition="quantity", quantity_alpha=0.5)
    table["algorithm"].update(rounds=2, lora_aggregation="product")
    cfg = from_dict(table)
    rows, summary = run_one(cfg, "ranks", progress=False)
    ranks = summary["lora_ranks"]
    assert len(ranks) == 3 and max(ranks.values()) == 4 and min(ranks.values()) >= 1
    assert all(np.isfinite(r["global_loss"]) for r in rows)
    assert 0 <= rows[-1]["lora_aggregation_error"] < 1  # the SVD truncation residual, relative


@pytest.mark.slow
def test_torchdist_ranks_run_per_client_lora_ranks_as_the_simulator(tmp_path):
    """FlexLoRA (product, ranks 1, 4, 2) on 2 torchrun ranks: the same adapter and the same error as in-process."""
    from safetensors.torch import load_file
    from test_export import write_config
    from test_torchdist import _torchrun

    from distdpo.cli import main

    data = tmp_path / "pairs.jsonl"
    write_arithmetic_pairs(data, 24)
    table = tiny_lm_table(data)
    table["policy"]["lora_r"] = [1, 4, 2]
    table["algorithm"].update(rounds=2, lora_aggregation="product")
    config = tmp_path / "run.toml"
    write_config(config, table)
    assert main(["run", str(config), "--out", str(tmp_path / "sim")]) == 0
    proc, _ = _torchrun(2, config, "--out", str(tmp_path / "dist"), "--set", 'engine.name="torchdist"', timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    simulated, distributed = (
        load_file(str(tmp_path / d / "models" / "run" / "adapter_model.safetensors")) for d in ("sim", "dist")
    )
    for key, value in simulated.items():
        assert distributed[key] == pytest.approx(value, abs=1e-5)
    rows = {}
    for d in ("sim", "dist"):
        with open(tmp_path / d / "metrics.csv") as f:
            rows[d] = list(csv.DictReader(f))
    for a, b in zip(rows["sim"][1:], rows["dist"][1:]):
        assert float(b["lora_aggregation_error"]) == pytest.approx(float(a["lora_aggregation_error"]), rel=1e-3)
        assert float(b["bytes_communicated"]) == float(a["bytes_communicated"])
