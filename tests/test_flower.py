"""Engine 'flower': the same federated DPO through Flower's simulation and on a loopback SuperLink."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="flwr is not installed (pip install -e '.[flower]')")

from helpers import make_config  # noqa: E402

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


def test_flower_refuses_what_it_cannot_run():
    from distdpo.config import ConfigError

    with pytest.raises(ConfigError, match="staleness"):
        _flower(_job(name="fedavg", staleness=1))
    with pytest.raises(ConfigError, match="engine.name = 'flower'"):
        _flower(make_config(algorithm={"name": "dsgd"}))
    with pytest.raises(ConfigError, match="checkpoint_dir"):
        _flower(_job(name="fedavg"), checkpoint_every=2)


# ---- deployment: flower-superlink + 3 flower-supernode on loopback, `flwr run` -----------------------


def _free_ports(k: int) -> list[int]:
    socks = [socket.socket() for _ in range(k)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _stop(procs: list[subprocess.Popen]) -> None:
    """Terminate every started process group (SuperLink/SuperNodes spawn SuperExec and app processes)."""
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(p.pid, signal.SIGKILL)  # whatever is left in the group, children included
        except ProcessLookupError:
            pass
        p.wait()


@pytest.mark.slow
def test_deployment_superlink_and_three_supernodes(tmp_path):
    bindir = Path(sys.executable).parent
    if not (bindir / "flower-superlink").exists() or shutil.which("flwr", path=str(bindir)) is None:
        pytest.skip("flower-superlink / flwr executables not found beside the Python interpreter")
    port, *node_ports = _free_ports(4)
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    job = tmp_path / "job.toml"
    job.write_text(
        "seed = 0\n[data]\nnum_clients = 3\npairs_per_client = 60\neval_pairs_per_client = 50\n"
        "dim = 6\nnum_actions = 4\n"
        '[algorithm]\nname = "fedavg"\nrounds = 2\nlocal_steps = 3\nlr = 0.3\nbatch_size = 16\n'
        '[engine]\nname = "flower"\nprogress = false\nflower_timeout = 120.0\n'
    )
    out = tmp_path / "run"
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> None:
        log = open(logs / f"{name}.log", "w")
        procs.append(
            subprocess.Popen(
                [str(bindir / args[0]), *args[1:]],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=tmp_path,
                start_new_session=True,
            )
        )

    try:
        start(
            "superlink",
            "flower-superlink",
            "--insecure",
            "--port",
            str(port),
            "--disable-runtime-dependency-installation",
        )
        for i, node_port in enumerate(node_ports):
            start(
                f"supernode{i}",
                "flower-supernode",
                "--insecure",
                "--superlink",
                f"127.0.0.1:{port}",
                "--port",
                str(node_port),
                "--node-config",
                f"partition-id={i} num-partitions=3",
            )
        result = subprocess.run(
            [
                str(bindir / "flwr"),
                "run",
                str(ROOT / "flower_app"),
                "loopback",
                "--stream",
                "--run-config",
                f'config="{job}" out="{out}"',
            ],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        summary_path = out / "summary.json"
        deadline = time.monotonic() + 60  # --stream may return as the ServerApp writes its last file
        while not summary_path.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert summary_path.exists(), result.stdout[-3000:] + "".join(p.read_text()[-2000:] for p in logs.iterdir())
        summary = json.loads(summary_path.read_text())
        assert summary["engine"] == "flower"
        final = summary["runs"]["run"]["final"]
        assert final["round"] == 2 and final["global_loss"] < math.log(2)
        lines = (out / "metrics.csv").read_text().splitlines()
        assert len(lines) == 1 + 3  # header + rounds 0, 1, 2
        # The deployed run is the simulator's run: same seeds, same math.
        from distdpo.config import load

        sim_rows, _ = run_one(load(job, ['engine.name="simulation"']), "run", Cache(), progress=False)
        assert final["global_loss"] == pytest.approx(sim_rows[-1]["global_loss"], rel=1e-5)
    finally:
        _stop(procs)


def test_a_failed_or_silent_client_is_named_by_its_partition():
    from types import SimpleNamespace

    from distdpo.engines.flower.server_app import ClientFailure, _raise_errors

    def reply(node, error=None):
        return SimpleNamespace(
            has_error=lambda: error is not None,
            metadata=SimpleNamespace(src_node_id=node),
            error=SimpleNamespace(reason=error),
        )

    partition_of, names = {101: 0, 202: 1, 303: 2}, ["annotator1", "annotator2", "annotator3"]
    with pytest.raises(
        ClientFailure, match=r"round 2: client 'annotator2' \(partition-id 1, node 202\) failed: actor died"
    ):
        _raise_errors([reply(101), reply(202, "actor died")], [101, 202], "round 2", partition_of, names)
    with pytest.raises(
        ClientFailure, match=r"1 of 3 clients did not reply .*client 'annotator3' \(partition-id 2, node 303\)"
    ):
        _raise_errors([reply(101), reply(202)], [101, 202, 303], "round 5", partition_of, names)
    _raise_errors([reply(101)], [101], "round 1", partition_of, names)  # every client answered: nothing raised


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
def test_strategy_state_resumes_every_strategy_class(name, server_lr, cls, monkeypatch):
    """The checkpoint adapter reads Flower's strategy attributes: a Flower upgrade that renames one fails here."""
    import torch
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from distdpo.engines.flower import common as wire
    from distdpo.engines.flower.strategies import Scaffold, load_strategy_state, make_strategy, strategy_state

    for key in ("_run_id", "_node_id", "_task_id"):  # messages need an identity outside a running app
        monkeypatch.setattr(TaskIdentity, key, 1)

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
