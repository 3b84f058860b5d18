"""Engine 'flower': the same federated DPO through Flower's simulation and on a loopback SuperLink."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="flwr is not installed (pip install -e '.[flower]')")

from helpers import HHH, make_config, need  # noqa: E402

from distdpo.experiment import Cache, run_one  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COMPARED = [
    "global_loss",
    "grad_norm_sq",
    "optimality_gap",
    "heterogeneity",
    "pref_accuracy",
    "true_pref_accuracy",
    "reward_margin",
    "eval_loss",
    "worst_client_loss",
    "client_drift",
]


def _job(**algorithm):
    # 4 clients of unequal size (p_i ∝ |D_i| matters), 3 rounds, every client every round unless overridden.
    return make_config(
        data={"num_clients": 4, "size_skew": 0.5}, algorithm={"rounds": 3, **algorithm}, engine={"flower_cpus": 2}
    )


def _flower(cfg, **engine):
    from distdpo.config import from_dict

    return from_dict(
        {k: v for k, v in cfg.to_dict().items() if k != "sweep"},
        [("engine.name", "flower"), *((f"engine.{k}", v) for k, v in engine.items())],
    )


def _assert_same(rows_a, rows_b, rel=1e-5):
    assert [r["round"] for r in rows_a] == [r["round"] for r in rows_b]
    for a, b in zip(rows_a, rows_b):
        for key in COMPARED:
            x, y = a[key], b[key]
            if isinstance(x, float) and math.isnan(x):
                assert math.isnan(y), key
            else:
                assert y == pytest.approx(x, rel=rel, abs=1e-9), (key, a["round"], x, y)


def test_fedavg_flower_simulation_matches_simulator():
    cfg = _job(name="fedavg")
    sim_rows, sim_summary = run_one(cfg, "run", Cache(), progress=False)
    fl_rows, fl_summary = run_one(_flower(cfg), "run", Cache(), progress=False)
    _assert_same(sim_rows, fl_rows)
    assert [r["bytes_communicated"] for r in fl_rows] == [r["bytes_communicated"] for r in sim_rows]
    assert fl_summary["engine"] == "flower" and set(fl_rows[-1]) == set(sim_rows[-1])


@pytest.mark.slow
@pytest.mark.parametrize(
    "algorithm",
    [
        {"name": "scaffold"},
        {"name": "fedprox", "mu": 0.1, "clients_per_round": 2},  # partial participation: distdpo's seeded sampling
        {"name": "fedavgm", "server_lr": 0.7},
    ],
)
def test_flower_matches_simulator(algorithm):
    cfg = _job(**algorithm)
    sim_rows, _ = run_one(cfg, "run", Cache(), progress=False)
    fl_rows, _ = run_one(_flower(cfg), "run", Cache(), progress=False)
    _assert_same(sim_rows, fl_rows)


@pytest.mark.slow
def test_checkpoint_resume_continues_exactly(tmp_path):
    cfg = _job(name="fedavgm")  # server momentum: the strategy's state must survive the restart
    full, _ = run_one(_flower(cfg), "run", Cache(), progress=False)
    ckpt = str(tmp_path / "ckpt")
    from distdpo.config import from_dict

    two = from_dict({k: v for k, v in cfg.to_dict().items() if k != "sweep"}, [("algorithm.rounds", 2)])
    run_one(_flower(two, checkpoint_every=1, checkpoint_dir=ckpt), "run", Cache(), progress=False)
    meta = json.loads((tmp_path / "ckpt" / "run" / "checkpoint.json").read_text())
    assert meta["round"] == 2 and len(list((tmp_path / "ckpt" / "run").glob("r*-rank0.safetensors"))) == 1
    resumed, _ = run_one(_flower(cfg, checkpoint_every=1, checkpoint_dir=ckpt), "run", Cache(), progress=False)
    _assert_same(full, resumed, rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(
    # SCAFFOLD on a causal LM in Flower: test_flower_sites' simulation of sites
    "name, lora",
    [("fedavg", "factors"), ("fedavg", "freeze_a"), ("fedavg", "product")],
)
def test_causal_lm_in_flower_matches_simulator(name, lora):
    """A LoRA-adapted built-in GPT-2 on 3 clients' text pairs: only the adapter travels (θ is the trainable
    parameters: B alone with freeze_a), and Flower's run is the simulator's within float32 reordering, the
    server's re-factoring of the replies (product) and lora_aggregation_error included."""
    from distdpo.config import from_dict

    cfg = from_dict(
        {
            "data": {"source": str(need(HHH)), "format": "trl", "partition": "iid", "num_clients": 3}
            | {"max_pairs": 36, "eval_fraction": 0.2, "loss_pairs_per_client": 2},
            "policy": {"kind": "causal_lm", "model": "builtin:gpt2-tiny", "max_length": 64, "lora_r": 2}
            | {"tokenizer_vocab_size": 300},
            "algorithm": {"name": name, "rounds": 2, "local_steps": 2, "batch_size": 2, "lr": 0.05}
            | {"lora_aggregation": lora},
            "engine": {"progress": False, "flower_cpus": 2},
        }
    )
    cache = Cache()
    task = cache.task(cfg)
    params = list(task.policy.model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    assert task.num_params == trainable == task.initial_params().numel() < 0.05 * sum(p.numel() for p in params)
    sim_rows, _ = run_one(cfg, "run", cache, progress=False)
    fl_rows, _ = run_one(_flower(cfg), "run", Cache(), progress=False)
    _assert_same(sim_rows, fl_rows, rel=1e-4)
    for sim, fl in zip(sim_rows[1:], fl_rows[1:]):  # a ratio of factor differences: float32's ~1e-7, amplified
        error = fl["lora_aggregation_error"]
        assert error <= 1e-6 if lora == "freeze_a" else error == pytest.approx(sim["lora_aggregation_error"], rel=1e-3)
    assert fl_rows[-1]["bytes_communicated"] == sim_rows[-1]["bytes_communicated"]


def test_flower_refuses_what_it_cannot_run():
    from distdpo.config import ConfigError

    with pytest.raises(ConfigError, match="staleness"):
        _flower(_job(name="fedavg", staleness=1))
    with pytest.raises(ConfigError, match="engine.name = 'flower'"):
        _flower(make_config(algorithm={"name": "dsgd"}))
    with pytest.raises(ConfigError, match="checkpoint_dir"):
        _flower(_job(name="fedavg"), checkpoint_every=2)


@pytest.fixture
def task_identity(monkeypatch):
    """Messages need a run identity outside a running app."""
    from flwr.supercore.task_identity import TaskIdentity

    for key in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, key, 1)


def test_missing_clients_are_named_and_a_restarted_supernode_is_found(task_identity):
    from types import SimpleNamespace

    from distdpo.engines.flower import common as wire
    from distdpo.engines.flower.nodes import ClientFailure, Nodes

    def reply(node, error=None, to=""):
        return SimpleNamespace(
            has_error=lambda: error is not None,
            metadata=SimpleNamespace(src_node_id=node, reply_to_message_id=to),
            error=SimpleNamespace(reason=error),
            content={"metrics": {wire.PARTITION: grid.nodes.get(node)}},
        )

    class Grid:
        nodes = {101: 0, 202: 1, 303: 2}  # node id → the partition-id it serves

        def get_node_ids(self):
            return list(self.nodes)

        def send_and_receive(self, messages, *, timeout=None):
            return [reply(m.metadata.dst_node_id) for m in messages if m.metadata.dst_node_id in self.nodes]

    grid = Grid()
    nodes = Nodes(grid, "config", 3, 1.0, ["annotator1", "annotator2", "annotator3"])
    assert nodes.node_of == {0: 101, 1: 202, 2: 303}
    sent = [SimpleNamespace(metadata=SimpleNamespace(message_id=f"m{n}", dst_node_id=n)) for n in (101, 202, 303)]
    # The SuperLink answers for a node it lost (src 0): the addressee is found from the message replied to.
    failed = reply(0, "Node Unavailable", to="m202")
    with pytest.raises(
        ClientFailure,
        match=r"round 2: 1 of 3 sampled clients replied .*, 2 needed \(engine.min_clients\); missing: "
        r"client 'annotator2' \(partition-id 1, node 202\): Node Unavailable; "
        r"client 'annotator3' \(partition-id 2, node 303\): no reply",
    ):
        nodes.check([reply(101), failed], sent, [0, 1, 2], 2, "round 2")
    assert len(nodes.check([reply(101), failed, reply(303)], sent, [0, 1, 2], 2, "round 3")) == 2
    # SuperNode 303 restarts as node 404: the next round finds it; 202 leaves for good.
    grid.nodes = {101: 0, 404: 2}
    nodes.refresh()
    assert nodes.node_of == {0: 101, 2: 404}
    with pytest.raises(ClientFailure, match=r"client 'annotator2' \(partition-id 1, no node\): no SuperNode"):
        nodes.check([reply(101)], sent, [0, 1], 2, "round 4")


@pytest.mark.parametrize(
    "name,server_lr,cls",
    [
        ("fedavg", 1.0, "FedAvg"),
        ("fedprox", 1.0, "FedProx"),
        ("fedavg", 0.7, "FedAvgM"),
        ("fedavgm", 0.7, "FedAvgM"),
        ("fedadam", 0.7, "FedAdam"),
        ("fedyogi", 0.7, "FedYogi"),
        ("fedadagrad", 0.7, "FedAdagrad"),
        ("scaffold", 0.7, "Scaffold"),
    ],
)
def test_strategy_state_resumes_every_strategy_class(name, server_lr, cls, task_identity):
    """The checkpoint adapter reads Flower's strategy attributes: a Flower upgrade that renames one fails here."""
    import torch
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    from distdpo.engines.flower import common as wire
    from distdpo.engines.flower.strategies import Scaffold, load_strategy_state, make_strategy, strategy_state

    class Grid:
        def get_node_ids(self):
            return [11, 12, 13]

    def one_round(strategy, theta, r):
        grid = Grid()
        sent = list(strategy.configure_train(r, wire.to_record(theta=theta), ConfigRecord({}), grid))
        replies = []
        for k, msg in enumerate(sent):
            x = theta + 0.1 * (k + 1) * (r + 1) * torch.arange(5, dtype=theta.dtype) ** (k + 1)
            metrics = MetricRecord({wire.NUM_EXAMPLES: 10 + k, wire.DRIFT: 0.0, wire.PARTITION: k})
            replies.append(Message(RecordDict({"arrays": wire.to_record(theta=x), "metrics": metrics}), reply_to=msg))
        arrays, _ = strategy.aggregate_train(r, replies)
        return wire.from_record(arrays, wire.THETA, theta.dtype)

    cfg = make_config(algorithm={"name": name, "server_lr": server_lr})
    task = type("Task", (), {"num_clients": 3, "num_params": 5})

    def fresh():
        strategy = make_strategy(cfg, task, torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64), 3)
        if isinstance(strategy, Scaffold):
            strategy.node_partition = {11: 0, 12: 1, 13: 2}
        return strategy

    ran = fresh()
    assert type(ran).__name__ == cls
    theta = one_round(ran, one_round(ran, torch.zeros(5), 1), 2)
    resumed = fresh()
    load_strategy_state(resumed, {k: v.clone() for k, v in strategy_state(ran).items()})
    expected = one_round(ran, theta, 3)
    assert torch.equal(one_round(resumed, theta, 3), expected)
    after = strategy_state(ran)
    assert all(torch.equal(v, after[k]) for k, v in strategy_state(resumed).items())  # SCAFFOLD's c and c_i too
    if name not in ("fedavg", "fedprox"):  # with state that matters, a strategy started afresh goes elsewhere
        restarted = fresh()
        one_round(restarted, theta, 3)
        assert any(not torch.equal(v, after[k]) for k, v in strategy_state(restarted).items() if k in after)
