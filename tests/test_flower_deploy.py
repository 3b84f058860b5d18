"""Engine 'flower' deployed on loopback: flower-superlink, 3 flower-supernode processes and `flwr run` of flower_app.

Each test starts the SuperLink and its SuperNodes (each in its own process group, so a SuperNode's SuperExec
and app processes die with it) and runs a small job, then compares it with the in-process simulator.
"""

from __future__ import annotations

import csv
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

from distdpo.config import load  # noqa: E402
from distdpo.experiment import Cache, run_one  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

JOB = (
    "seed = 0\n[data]\nnum_clients = 3\npairs_per_client = 60\neval_pairs_per_client = 50\ndim = 6\nnum_actions = 4\n"
    '[algorithm]\nname = "fedavg"\nrounds = {rounds}\nlocal_steps = 3\nlr = 0.3\nbatch_size = 16\n'
    '[engine]\nname = "flower"\nprogress = false\nflower_timeout = {timeout}\n{engine}'
)


def _free_ports(k: int) -> list[int]:
    socks = [socket.socket() for _ in range(k)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Deployment:
    """A SuperLink and SuperNodes on loopback, `flwr run` against them, and a clean stop of every process group."""

    def __init__(self, tmp_path: Path, num_nodes: int = 3):
        if not (BIN / "flower-superlink").exists() or shutil.which("flwr", path=str(BIN)) is None:
            pytest.skip("flower-superlink / flwr executables not found beside the Python interpreter")
        self.tmp, self.num_nodes = tmp_path, num_nodes
        self.port, *self.node_ports = _free_ports(1 + num_nodes)
        home = tmp_path / "flwr-home"
        home.mkdir()
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{self.port}"\n'
            "insecure = true\n"
        )
        self.env = {
            **os.environ,
            "FLWR_HOME": str(home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        self.env.pop("DISTDPO_FAULT", None)
        self.logs = tmp_path / "logs"
        self.logs.mkdir()
        self.procs: dict[str, subprocess.Popen] = {}

    def _start(self, name: str, args: list[str], env: dict) -> None:
        with open(self.logs / f"{name}.log", "w") as log:
            self.procs[name] = subprocess.Popen(
                [str(BIN / args[0]), *args[1:]],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.tmp,
                start_new_session=True,
            )

    def __enter__(self) -> Deployment:
        return self

    def start(self, node_env: dict[int, dict[str, str]] | None = None, node_config: dict[int, str] | None = None):
        """The SuperLink and one SuperNode per partition (``node_env``: extra environment of some SuperNodes;
        ``node_config``: more of their node config, e.g. a site's files)."""
        self._start(
            "superlink",
            ["flower-superlink", "--insecure", "--port", str(self.port), "--disable-runtime-dependency-installation"],
            self.env,
        )
        for i in range(self.num_nodes):
            node = f"partition-id={i} num-partitions={self.num_nodes} {(node_config or {}).get(i, '')}".strip()
            self._start(
                f"supernode{i}",
                ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}", "--port"]
                + [str(self.node_ports[i]), "--node-config", node],
                {**self.env, **(node_env or {}).get(i, {})},
            )
        return self

    def run(self, job: Path, out: Path, timeout: float = 300) -> dict:
        """`flwr run` the job into ``out``; returns its summary.json (asserting the run finished)."""
        result = subprocess.run(
            [str(BIN / "flwr"), "run", str(ROOT / "flower_app"), "loopback", "--stream"]
            + ["--run-config", f'config="{job}" out="{out}"'],
            env=self.env,
            cwd=self.tmp,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        summary = out / "summary.json"
        deadline = time.monotonic() + 60  # --stream may return as the ServerApp writes its last file
        while not summary.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert summary.exists(), result.stdout[-3000:] + self.log_tail()
        return json.loads(summary.read_text())

    def log_tail(self) -> str:
        return "".join(f"\n--- {p.name}\n" + p.read_text()[-2000:] for p in sorted(self.logs.iterdir()))

    def __exit__(self, *exc) -> None:
        procs = list(self.procs.values())
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


def _job(tmp_path: Path, rounds: int = 2, timeout: float = 120.0, engine: str = "") -> Path:
    path = tmp_path / "job.toml"
    path.write_text(JOB.format(rounds=rounds, timeout=timeout, engine=engine))
    return path


def _rows(out: Path) -> list[dict]:
    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_deployment_superlink_and_three_supernodes(tmp_path):
    job, out = _job(tmp_path), tmp_path / "run"
    with Deployment(tmp_path) as d:
        summary = d.start().run(job, out)
    assert summary["engine"] == "flower"
    final = summary["runs"]["run"]["final"]
    assert final["round"] == 2 and final["global_loss"] < math.log(2)
    assert [r["clients_replied"] for r in _rows(out)] == ["nan", "3", "3"]  # rounds 0, 1, 2
    # The deployed run is the simulator's run: same seeds, same math.
    sim_rows, _ = run_one(load(job, ['engine.name="simulation"']), "run", Cache(), progress=False)
    assert final["global_loss"] == pytest.approx(sim_rows[-1]["global_loss"], rel=1e-5)


@pytest.mark.slow
def test_a_dead_supernode_does_not_stop_the_run(tmp_path):
    """SuperNode 2 dies (SIGKILL to its process group, as a crashed machine) when round 2 reaches it:
    with engine.min_clients = 2 rounds 2 and 3 aggregate the two replies they get, and the run finishes."""
    job, out = _job(tmp_path, rounds=3, timeout=30.0, engine="min_clients = 2\n"), tmp_path / "run"
    with Deployment(tmp_path) as d:
        summary = d.start(node_env={2: {"DISTDPO_FAULT": "killjob:2:2"}}).run(job, out)
        assert d.procs["supernode2"].poll() is not None, "the fault did not kill SuperNode 2" + d.log_tail()
    rows = _rows(out)
    assert [r["clients_replied"] for r in rows] == ["nan", "3", "2", "2"]
    assert summary["runs"]["run"]["final"]["clients_replied"] == 2
    assert float(rows[-1]["global_loss"]) < float(rows[1]["global_loss"])  # and it kept training


@pytest.mark.slow
def test_secure_aggregation_on_three_supernodes(tmp_path):
    """One FedAvg round through SecAgg+ (secaggplus_mod on each SuperNode) against the simulator."""
    from test_flower_privacy import assert_within_quantization

    engine = f'secure_aggregation = true\ncheckpoint_every = 1\ncheckpoint_dir = "{tmp_path / "secure"}"\n'
    job, out = _job(tmp_path, rounds=1, engine=engine), tmp_path / "run"
    with Deployment(tmp_path) as d:
        d.start().run(job, out)
    cfg = load(job, ['engine.name="simulation"', f'engine.checkpoint_dir="{tmp_path / "plain"}"'])
    run_one(cfg, "run", Cache(), progress=False)
    assert_within_quantization(tmp_path / "plain", tmp_path / "secure", Cache().task(cfg).client_sizes.tolist())
    assert [r["clients_replied"] for r in _rows(out)] == ["nan", "3"]
