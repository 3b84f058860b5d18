"""Engine torchdist over real gloo processes (torchrun on loopback): same numbers as the simulator, faults, resume."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import TINY_DATA

from distdpo.cli import build_parser
from distdpo.config import load
from distdpo.engines.torchdist import block
from distdpo.experiment import run_experiment

# n = 6 nodes; every algorithm of the issue on a ring, an Erdős–Rényi graph and a time-varying graph.
# S = 4 of 6 clients: with 3 ranks some rank often holds no sampled client.
EQUIV = f"""
seed = 1
{TINY_DATA}[algorithm]
rounds = 4
local_steps = 2
lr = 0.3
clients_per_round = 4
[engine]
progress = false
[sweep]
"algorithm.name" = ["fedavg", "scaffold", "dsgd", "gradient_tracking"]
"topology.graph" = ["ring", "erdos_renyi", "one_peer_exponential"]
"""

FAULT = f"""
seed = 1
{TINY_DATA}[algorithm]
name = "gradient_tracking"
rounds = 12
local_steps = 2
lr = 0.3
[engine]
progress = false
timeout_s = 4
"""

UNTIMED = ("wall_time_s",)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int, config: Path, *args: str, fault: str = "", timeout: float = 150, new_session: bool = False):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1",
        f"--master-port={_free_port()}",
        "-m",
        "distdpo",
        str(config),
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DISTDPO_FAULT", None)
    if fault:
        env["DISTDPO_FAULT"] = fault
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, start_new_session=new_session)
    return proc, time.monotonic() - t0


def _close(a, b, rtol=1e-5) -> bool:
    if a is None or b is None or (isinstance(a, float) and math.isnan(a)):
        return (a is None or math.isnan(a)) == (b is None or (isinstance(b, float) and math.isnan(b)))
    return abs(a - b) <= rtol * max(abs(a), abs(b)) + 1e-12


def _assert_same_finals(expected: dict, got: dict, rtol=1e-5):
    assert set(got["runs"]) == set(expected["runs"])
    for label, run in expected["runs"].items():
        for key, value in run["final"].items():
            if key in UNTIMED or key.startswith("comm_") or not isinstance(value, (int, float, type(None))):
                continue
            assert _close(value, got["runs"][label]["final"][key], rtol), (
                label,
                key,
                value,
                got["runs"][label]["final"][key],
            )


@pytest.fixture(scope="module")
def equiv(tmp_path_factory):
    d = tmp_path_factory.mktemp("equiv")
    (d / "cfg.toml").write_text(EQUIV)
    sim = run_experiment(load(d / "cfg.toml"), d / "sim", progress=False)
    return d, json.loads((sim / "summary.json").read_text())


def test_block_placement_is_contiguous_and_balanced():
    blocks = [block(7, 3, r) for r in range(3)]
    assert [list(b) for b in blocks] == [[0, 1, 2], [3, 4], [5, 6]]
    assert [list(block(6, 6, r)) for r in range(6)] == [[r] for r in range(6)]


@pytest.mark.parametrize("nproc", [2, 3])
def test_torchdist_matches_simulator(equiv, nproc):
    d, expected = equiv
    out = d / f"td{nproc}"
    proc, _ = _torchrun(nproc, d / "cfg.toml", "--out", str(out), "--set", "engine.name=torchdist", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((out / "summary.json").read_text())
    _assert_same_finals(expected, got)
    run = got["runs"]["name=dsgd,graph=ring"]
    assert run["engine"] == "torchdist" and run["torchdist"]["world_size"] == nproc
    assert all(run["final"][f"comm_bytes/rank{r}"] > 0 for r in range(nproc))
    # Every round, not only the last, matches; and rank 0 alone printed the table.
    sim_rows = (d / "sim" / "metrics.csv").read_text().splitlines()
    td_rows = (out / "metrics.csv").read_text().splitlines()
    assert len(sim_rows) == len(td_rows)
    assert proc.stdout.count("run directory:") == 1


def test_dead_rank_fails_fast_naming_it(tmp_path):
    (tmp_path / "cfg.toml").write_text(FAULT)
    proc, elapsed = _torchrun(
        2, tmp_path / "cfg.toml", "--out", str(tmp_path / "out"), "--set", "engine.name=torchdist", fault="exit:1:3"
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert elapsed < 60
    assert re.search(r"rank\s*:?\s*1\b", out, re.I), out[-3000:]
    assert not (tmp_path / "out" / "summary.json").exists()


def test_hung_rank_is_named_within_the_timeout(tmp_path):
    (tmp_path / "cfg.toml").write_text(FAULT)
    proc, elapsed = _torchrun(
        2, tmp_path / "cfg.toml", "--out", str(tmp_path / "out"), "--set", "engine.name=torchdist", fault="hang:1:3"
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "rank 1 stopped responding at round 3" in out, out[-3000:]
    assert elapsed < 60


def test_killed_job_resumes_to_the_uninterrupted_numbers(tmp_path):
    (tmp_path / "cfg.toml").write_text(FAULT)
    sets = [
        "--set",
        "engine.name=torchdist",
        "--set",
        "engine.checkpoint_every=3",
        "--set",
        f"engine.checkpoint_dir={tmp_path / 'ckpt'}",
        "--no-progress",
    ]
    out = tmp_path / "out"
    # SIGKILL to the launcher and both ranks at once at the start of round 8 (last checkpoint: round 6).
    proc, _ = _torchrun(2, tmp_path / "cfg.toml", "--out", str(out), *sets, fault="killjob:0:8", new_session=True)
    assert proc.returncode != 0 and not (out / "summary.json").exists()
    assert json.loads((tmp_path / "ckpt" / "run" / "checkpoint.json").read_text())["round"] == 6
    proc, _ = _torchrun(2, tmp_path / "cfg.toml", "--out", str(out), *sets, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((out / "summary.json").read_text())
    rows = [r for r in (out / "metrics.csv").read_text().splitlines()[1:]]
    assert [int(r.split(",")[1]) for r in rows] == list(range(13))
    ref = run_experiment(load(tmp_path / "cfg.toml"), tmp_path / "sim", progress=False)
    _assert_same_finals(json.loads((ref / "summary.json").read_text()), got)


def test_launch_builds_a_torchrun_command():
    args = build_parser().parse_args(["launch", "--nproc", "3", "c.toml", "--set", "algorithm.lr=0.1", "--resume"])
    from distdpo.launch import torchrun_argv

    argv = torchrun_argv(args)
    assert argv[:3] == ["--nproc-per-node=3", "--nnodes=1", "--standalone"]
    assert argv[3:] == [
        "-m",
        "distdpo",
        "run",
        "c.toml",
        "--set",
        "algorithm.lr=0.1",
        "--set",
        'engine.name="torchdist"',
        "--resume",
    ]
    multi = build_parser().parse_args(
        ["launch", "--nproc", "2", "--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "h:29400", "c.toml"]
    )
    assert "--rdzv-endpoint=h:29400" in torchrun_argv(multi) and "--node-rank=1" in torchrun_argv(multi)


def test_ctrl_c_stops_every_rank_cleanly(tmp_path):
    (tmp_path / "cfg.toml").write_text(FAULT)
    ckpt = tmp_path / "ckpt" / "run" / "checkpoint.json"
    cmd = [
        sys.executable,
        "-m",
        "distdpo",
        "launch",
        "--nproc",
        "2",
        "--master-port",
        str(_free_port()),
        str(tmp_path / "cfg.toml"),
        "--out",
        str(tmp_path / "out"),
        "--no-progress",
        "--set",
        "algorithm.rounds=1000000",
        "--set",
        "engine.checkpoint_every=5",
        "--set",
        f"engine.checkpoint_dir={tmp_path / 'ckpt'}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DISTDPO_FAULT", None)
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    deadline = time.monotonic() + 120
    while not ckpt.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert ckpt.exists(), proc.communicate()[0][-3000:] if proc.poll() is not None else "no checkpoint"
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: every process of the job gets SIGINT
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert out.count("interrupted") == 1
