"""Config validation, the CLI and the run directory."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_DATA

from distdpo import config as C
from distdpo.cli import main
from distdpo.config import ConfigError, expand, from_dict, load, parse_override
from distdpo.experiment import COLUMNS
from distdpo.io import write_text_atomic

SMALL = f"""
seed = 1
{TINY_DATA}[algorithm]
rounds = 4
local_steps = 2
lr = 0.3
[topology]
graph = "ring"
[engine]
progress = false
[sweep]
"algorithm.name" = ["fedavg", "dsgd"]
"""


def write(tmp_path, text, name="cfg.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "table, message",
    [
        ({"algorithm": {"lrr": 0.1}}, "unknown config key 'algorithm.lrr' \\(did you mean 'lr'\\?\\)"),
        ({"algoritm": {"lr": 0.1}}, "unknown config section 'algoritm'"),
        ({"algorithm": {"lr": -0.1}}, "algorithm.lr must be positive"),
        (
            {"algorithm": {"clients_per_round": 20}, "data": {"num_clients": 8}},
            "clients_per_round = 20 exceeds data.num_clients = 8",
        ),
        ({"algorithm": {"batch_size": "half"}}, 'algorithm.batch_size must be a positive integer or "full"'),
        ({"algorithm": {"name": "fedavgg"}}, "did you mean 'fedavg'"),
        ({"algorithm": {"rounds": 2.5}}, "algorithm.rounds must be an integer"),
        ({"algorithm": {"name": "dsgd", "aggregation": "size"}}, "impossible for decentralized"),
        ({"sweep": {"algorithm.lr": [0.1, -1.0]}}, "algorithm.lr must be positive"),
        ({"sweep": {"algorithm.nope": [1]}}, "unknown config key 'algorithm.nope'"),
        ({"policy": {"loss_type": "hinge", "label_smoothing": 0.1}}, "label_smoothing = 0.1 has no meaning"),
        ({"policy": {"loss_type": "ipo", "label_smoothing": 0.1}}, "label_smoothing = 0.1 has no meaning"),
        ({"algorithm": {"name": "gradient_tracking", "gossip": "cta"}}, "'cta' is for DSGD"),
        ({"algorithm": {"batch_size": 0}}, 'algorithm.batch_size must be a positive integer or "full", got 0'),
        ({"algorithm": {"batch_size": True}}, 'algorithm.batch_size must be a positive integer or "full"'),
        ({"algorithm": {"mu": -1}}, "algorithm.mu must be non-negative, got -1.0"),
        ({"algorithm": {"server_momentum": 1}}, "algorithm.server_momentum must be below 1, got 1.0"),
        ({"algorithm": {"name": "scaffold", "optimizer": "adamw"}}, "scaffold needs 'sgd'"),
        ({"data": {"eval_fraction": 1.0}}, "data.eval_fraction must be below 1, got 1.0"),
        ({"data": {"label_noise": 0.5}}, "data.label_noise must be below 0.5, got 0.5"),
        ({"data": {"num_actions": 1}}, "data.num_actions must be at least 2, got 1"),
        ({"data": {"partition": "dirichet"}}, "data.partition must be one of .* \\(did you mean 'dirichlet'\\?\\)"),
        ({"policy": {"label_smoothing": 0.5}}, "policy.label_smoothing must be below 0.5"),
        ({"policy": {"lora_target_modules": "q_proj"}}, "policy.lora_target_modules must be a list of strings"),
        ({"engine": {"progress": 1}}, "engine.progress must be true or false"),
        ({"engine": {"dp_side": "both"}}, "engine.dp_side must be one of 'server', 'client', got 'both'"),
        ({"topology": {"er_p": 1.5}}, "topology.er_p must be a probability"),
        ({"seed": "x"}, "seed must be an integer"),
    ],
)
def test_bad_config_is_refused_naming_the_key(table, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(table)


def test_every_key_carries_a_doc_and_a_default_that_passes_its_own_checks():
    assert len(C.KEYS) > 60 and "seed" in C.KEYS and "algorithm.lr" in C.KEYS
    for key, f in C.KEYS.items():
        meta, value = f.metadata, C.default(key)
        assert meta["doc"] and "\n" not in meta["doc"], key
        assert C._coerce(key, value, meta) == value, key
        assert meta["choices"] is None or value in meta["choices"], key
    assert C.default("policy.lora_target_modules") is not C.default("policy.lora_target_modules")  # a fresh list
    assert C.Config().to_dict()["algorithm"]["batch_size"] == 32


def test_choices_are_the_owning_modules_names():
    from distdpo import engines, losses, topology
    from distdpo.algorithms import optim
    from distdpo.data import partition, text

    meta = lambda key: C.KEYS[key].metadata
    assert meta("policy.loss_type")["choices"] == losses.LOSS_TYPES
    assert meta("data.partition")["choices"] == partition.PARTITIONS
    assert meta("data.format")["choices"] == text.FORMATS
    assert meta("data.on_error")["choices"] == text.ON_ERROR
    assert meta("data.pandalm_mode")["choices"] == text.PANDALM_MODES
    assert meta("engine.name")["choices"] == tuple(engines.ENGINES)
    assert meta("algorithm.optimizer")["choices"] == optim.CLIENT_OPTIMIZERS
    assert meta("algorithm.server_optimizer")["choices"] == ("auto", *optim.SERVER_OPTIMIZERS)
    assert meta("topology.weights")["choices"] == topology.WEIGHTS


def test_engine_specific_keys_are_marked_with_their_engine():
    marked = {key: f.metadata["engine"] for key, f in C.KEYS.items() if f.metadata["engine"]}
    assert marked == {
        **dict.fromkeys(
            [
                "engine.dp_clip",
                "engine.dp_noise",
                "engine.dp_side",
                "engine.dp_delta",
                "engine.flower_cpus",
                "engine.flower_timeout",
                "engine.min_clients",
                "engine.secure_aggregation",
            ],
            "flower",
        ),
        "engine.backend": "torchdist",
        "engine.timeout_s": "torchdist",
    }


def test_the_algorithm_registry():
    specs = C.ALGORITHM_SPECS
    assert C.ALGORITHMS == tuple(specs) and set(C.FEDERATED) | set(C.DECENTRALIZED) | {"centralized"} == set(specs)
    assert {s.family for s in specs.values()} == set(C.FAMILIES)
    assert {s.server_optimizer for s in specs.values()} <= set(C.SERVER_OPTIMIZERS)
    assert [n for n, s in specs.items() if s.sgd_only] == ["scaffold", "gradient_tracking"]
    resolve = lambda **a: C.resolve_server_optimizer(from_dict({"algorithm": a}).algorithm)
    assert resolve(name="fedadam") == "adam" and resolve(name="fedavgm") == "avgm" and resolve(name="fedavg") == "sgd"
    assert resolve(name="fedadam", server_optimizer="yogi") == "yogi"
    refused = [n for n in specs if n not in C.FEDERATED]
    for name in refused:
        with pytest.raises(ConfigError, match="engine.name = 'flower' runs the federated algorithms"):
            from_dict({"algorithm": {"name": name, "aggregation": "uniform"}, "engine": {"name": "flower"}})


def test_importing_the_config_imports_no_torch():
    code = (
        "import sys, distdpo.config; heavy = {'torch', 'transformers', 'networkx', 'pandas', 'datasets'}; "
        "print(sorted(heavy & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_set_overrides_and_sweep_product(tmp_path):
    cfg = load(write(tmp_path, SMALL), ["algorithm.lr=0.05", "sweep.algorithm.local_steps=[1, 3]"])
    assert cfg.algorithm.lr == 0.05
    runs = expand(cfg)
    assert list(runs) == [
        "name=fedavg,local_steps=1",
        "name=fedavg,local_steps=3",
        "name=dsgd,local_steps=1",
        "name=dsgd,local_steps=3",
    ]
    assert runs["name=dsgd,local_steps=3"].algorithm.local_steps == 3
    assert parse_override("topology.graph=ring") == ("topology.graph", "ring")
    assert parse_override('algorithm.batch_size="full"') == ("algorithm.batch_size", "full")


def test_run_writes_the_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(write(tmp_path, SMALL)), "--out", str(out), "--no-progress"]) == 0
    assert "name=dsgd" in capsys.readouterr().out
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == COLUMNS
    assert len(rows) == 2 * (4 + 1)  # round 0 plus 4 rounds, per run
    summary = json.loads((out / "summary.json").read_text())
    fed, dec = summary["runs"]["name=fedavg"], summary["runs"]["name=dsgd"]
    assert fed["f_star"] is not None and fed["heterogeneity"] > 0 and fed["grad_noise"] > 0
    assert dec["spectral_gap"] == pytest.approx((2 / 3) * (1 - np.cos(2 * np.pi / 6)))
    assert "synthetic" in summary["data"]
    for png in ("loss.png", "grad_norm_sq.png", "optimality_gap.png", "consensus_distance.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert "[sweep]" in (out / "config.toml").read_text()
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    # a second run into the same directory is refused; --resume skips the finished runs
    assert main(["run", str(write(tmp_path, SMALL)), "--out", str(out)]) == 2
    before = (out / "metrics.csv").read_text()
    assert main(["run", str(write(tmp_path, SMALL)), "--out", str(out), "--resume", "--no-progress"]) == 0
    assert (out / "metrics.csv").read_text() == before


def test_resume_continues_an_interrupted_sweep(tmp_path):
    cfg_path = write(tmp_path, SMALL)
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["run", str(cfg_path), "--out", str(full), "--no-progress"]) == 0
    assert main(["run", str(cfg_path), "--out", str(part), "--no-progress"]) == 0
    summary = json.loads((part / "summary.json").read_text())
    del summary["runs"]["name=dsgd"]  # as if the job died during the second run
    (part / "summary.json").write_text(json.dumps(summary))
    assert main(["run", str(cfg_path), "--out", str(part), "--resume", "--no-progress"]) == 0
    strip = lambda p: [r[:-1] for r in csv.reader(p.read_text().splitlines())]  # wall time differs
    assert strip(part / "metrics.csv") == strip(full / "metrics.csv")


def test_disconnected_graph_and_bad_matrix_are_refused_before_work(tmp_path, capsys):
    edges = write(tmp_path, "0 1\n1 2\n3 4\n4 5\n", "edges.txt")
    bad = SMALL.replace('graph = "ring"', f'graph = "{edges}"')
    out = tmp_path / "never"
    assert main(["run", str(write(tmp_path, bad)), "--out", str(out)]) == 2
    assert "disconnected" in capsys.readouterr().err
    assert not out.exists()
    W = np.full((6, 6), 1 / 6)
    W[0, 0] += 0.1
    np.save(tmp_path / "W.npy", W)
    badw = SMALL.replace('graph = "ring"', f'graph = "complete"\nmatrix = "{tmp_path / "W.npy"}"')
    assert main(["run", str(write(tmp_path, badw)), "--out", str(out)]) == 2
    assert "doubly stochastic" in capsys.readouterr().err
    assert not out.exists()


def test_unknown_key_in_file_names_file_key(tmp_path, capsys):
    assert main(["run", str(write(tmp_path, SMALL + "\n[policy]\nbetta = 0.1\n"))]) == 2
    assert "policy.betta" in capsys.readouterr().err


def test_graph_command(capsys):
    assert main(["graph", "ring", "--nodes", "8", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_nodes"] == 8 and info["num_edges"] == 8 and info["connected"] is True
    assert info["spectral_gap"] == pytest.approx((2 / 3) * (1 - np.cos(2 * np.pi / 8)))
    assert main(["graph", "hypercube", "--nodes", "6"]) == 2
    assert "power of 2" in capsys.readouterr().err


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "f.txt"
    write_text_atomic(target, "old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_text_atomic(target, "new")
    assert target.read_text() == "old"
    assert list(Path(tmp_path).iterdir()) == [target]
