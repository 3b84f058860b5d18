"""Checkpoints and resume: algorithm state round-trips, and a killed simulator run resumes to identical numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import TINY_DATA, make_config

from distdpo import build
from distdpo.checkpoint import RunCheckpoint
from distdpo.cli import main
from distdpo.config import ConfigError, load
from distdpo.engines.simulation import SimulatedCommunicator
from distdpo.experiment import run_experiment
from distdpo.metrics import Recorder

SWEEP = f"""
seed = 2
{TINY_DATA}[algorithm]
rounds = 9
local_steps = 2
lr = 0.3
[engine]
progress = false
checkpoint_every = 2
[sweep]
"algorithm.name" = ["fedavg", "dsgd"]
"""


def _parts(cfg):
    task = build.build_task(cfg)
    weights = build.client_weights(cfg, task.client_sizes)
    topology = build.build_topology(cfg)
    comm = SimulatedCommunicator(task.num_clients, topology)
    return task, weights, topology, build.build_algorithm(cfg, task, comm, topology, weights)


@pytest.mark.parametrize(
    "algorithm",
    [
        {"name": "fedadam", "staleness": 2, "clients_per_round": 5},
        {"name": "scaffold", "clients_per_round": 4},
        {"name": "gradient_tracking"},
        {"name": "centralized", "optimizer": "adamw"},
    ],
)
def test_state_round_trip_continues_bit_for_bit(tmp_path, algorithm):
    cfg = make_config(
        algorithm={**algorithm, "rounds": 6}, engine={"checkpoint_every": 3, "checkpoint_dir": str(tmp_path)}
    )
    *_, straight = _parts(cfg)
    for r in range(6):
        straight.run_round(r)
    task, weights, topology, first = _parts(cfg)
    rec = Recorder(cfg, "x", task, weights, topology, None)
    for r in range(3):
        first.run_round(r)
    RunCheckpoint(cfg, "x").save(3, first, rec, 1.5)
    *_, resumed = _parts(cfg)
    start, wall, _ = RunCheckpoint(cfg, "x").restore(resumed, rec)
    assert (start, wall) == (3, 1.5)
    for r in range(3, 6):
        resumed.run_round(r)
    assert torch.equal(straight.global_params(), resumed.global_params())


def test_checkpoint_of_another_config_is_refused(tmp_path):
    cfg = make_config(engine={"checkpoint_every": 1, "checkpoint_dir": str(tmp_path)})
    task, weights, topology, algo = _parts(cfg)
    rec = Recorder(cfg, "x", task, weights, topology, None)
    RunCheckpoint(cfg, "x").save(1, algo, rec, 0.0)
    other = make_config(algorithm={"lr": 0.2}, engine={"checkpoint_every": 1, "checkpoint_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="different config"):
        RunCheckpoint(other, "x").restore(_parts(other)[-1], rec)


def test_killed_simulator_sweep_resumes_to_identical_numbers(tmp_path):
    cfg_path = tmp_path / "cfg.toml"
    cfg_path.write_text(SWEEP)
    sets = ["--set", f"engine.checkpoint_dir={tmp_path / 'ckpt'}"]
    out = tmp_path / "out"
    # The first run of the sweep (fedavg) is killed with its process group at round 6 (last checkpoint: 4);
    # the resumed sweep continues fedavg from round 4, then runs dsgd.
    env = {**os.environ, "DISTDPO_FAULT": "killjob:0:6", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "distdpo", str(cfg_path), "--out", str(out), *sets, "--no-progress"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        start_new_session=True,
    )
    assert proc.returncode == -9
    assert json.loads((tmp_path / "ckpt" / "name=fedavg" / "checkpoint.json").read_text())["round"] == 4
    assert main(["run", str(cfg_path), "--out", str(out), *sets, "--resume", "--no-progress"]) == 0
    got = json.loads((out / "summary.json").read_text())
    ref = run_experiment(
        load(cfg_path, [f"engine.checkpoint_dir={tmp_path / 'ref'}"]), tmp_path / "ref_out", progress=False
    )
    expected = json.loads((ref / "summary.json").read_text())
    for label, run in expected["runs"].items():
        for key, value in run["final"].items():
            if key != "wall_time_s":
                assert got["runs"][label]["final"][key] == value, (label, key)
    rows = (out / "metrics.csv").read_text().splitlines()[1:]
    assert len(rows) == 2 * 10  # rounds 0..9 of each run, none repeated
