"""Run a config (and its sweep) in the simulator into a run directory.

The directory holds ``config.toml`` (resolved), ``metrics.csv`` (one row per
round per run, round 0 = before training), ``summary.json`` and PNG plots.
Files are rewritten atomically after every finished run, so an interrupted
sweep keeps what it finished and ``--resume`` continues from there.
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from typing import Any

import tomli_w
import torch
from tqdm.auto import tqdm

from distdpo import build
from distdpo.config import Config, ConfigError, expand
from distdpo.engines.simulation import SimulatedCommunicator
from distdpo.io import write_csv_atomic, write_json_atomic, write_text_atomic
from distdpo.solver import solve_centralized

COLUMNS = [
    "run", "round", "algorithm", "global_loss", "grad_norm_sq", "optimality_gap",
    "consensus_distance", "consensus_distance_before_gossip", "consensus_distance_after_gossip",
    "client_drift", "heterogeneity", "pref_accuracy", "pref_accuracy_worst", "true_pref_accuracy",
    "reward_margin", "eval_loss", "rewards/chosen", "rewards/rejected", "logratio_chosen",
    "worst_client_loss", "bytes_communicated", "wall_time_s",
]

DATA_NOTE = (
    "synthetic personalized Bradley–Terry preferences with known per-user rewards (not human data); "
    "clients simulated in one process"
)


class _Cache:
    """Tasks and f★ shared by the runs of a sweep that use the same data, policy and weighting."""

    def __init__(self):
        self.tasks: dict[tuple, Any] = {}
        self.optima: dict[tuple, Any] = {}

    def task(self, cfg: Config):
        key = build.task_key(cfg)
        if key not in self.tasks:
            self.tasks[key] = build.build_task(cfg)
        return self.tasks[key]

    def optimum(self, cfg: Config, task, weights: torch.Tensor):
        key = (build.task_key(cfg), tuple(weights.tolist()))
        if key not in self.optima:
            self.optima[key] = solve_centralized(task, weights) if task.convex else None
        return self.optima[key]


def run_one(cfg: Config, label: str, cache: _Cache | None = None, *, progress: bool = True) -> tuple[list[dict], dict]:
    """Train one configuration; returns its metric rows and its summary entry."""
    cache = cache or _Cache()
    task = cache.task(cfg)
    weights = build.client_weights(cfg, task.client_sizes)
    topology = build.build_topology(cfg)
    sparse = {"auto": "auto", "dense": False, "sparse": True}[cfg.engine.sparse_mix]
    comm = SimulatedCommunicator(task.num_clients, topology, sparse=sparse, dtype=build.torch_dtype(cfg), device=build.device(cfg))
    algo = build.build_algorithm(cfg, task, comm, topology, weights)
    optimum = cache.optimum(cfg, task, weights)
    f_star = optimum.f_star if optimum is not None else math.nan

    def row(r: int, stats: dict, wall: float, total_bytes: int) -> dict:
        m = task.evaluate(algo.global_params(), weights)
        out = {c: math.nan for c in COLUMNS}
        out.update(m)
        out.update({k: v for k, v in stats.items() if k != "bytes"})
        out.update(run=label, round=r, algorithm=cfg.algorithm.name, bytes_communicated=total_bytes, wall_time_s=wall)
        out["optimality_gap"] = m["global_loss"] - f_star
        return out

    rows = [row(0, {}, 0.0, 0)]
    wall, total_bytes = 0.0, 0
    a = cfg.algorithm
    bar = tqdm(range(1, a.rounds + 1), desc=label, leave=False, disable=None if (progress and cfg.engine.progress) else True, unit="round")
    for r in bar:
        t0 = time.perf_counter()
        stats = algo.run_round(r - 1)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall += time.perf_counter() - t0
        total_bytes += int(stats.get("bytes", 0))
        if r % cfg.engine.eval_every == 0 or r == a.rounds:
            rows.append(row(r, stats, wall, total_bytes))
            bar.set_postfix(loss=f"{rows[-1]['global_loss']:.4f}")
            if not math.isfinite(rows[-1]["global_loss"]):
                raise FloatingPointError(f"run {label!r} diverged at round {r} (global loss {rows[-1]['global_loss']}); lower algorithm.lr")
    bar.close()

    final = rows[-1]
    summary: dict[str, Any] = {
        "algorithm": a.name,
        "final": {k: final[k] for k in COLUMNS if k not in ("run", "algorithm")},
        "f_star": optimum.f_star if optimum is not None else None,
        "num_clients": task.num_clients,
        "num_params": task.num_params,
        "aggregation": build.aggregation(cfg),
    }
    # ζ² and σ² at θ★ for the convex case; at the final model otherwise (no θ★ exists).
    theta_ref = optimum.theta if optimum is not None else algo.global_params()
    summary["heterogeneity"] = float(task.evaluate(theta_ref, weights)["heterogeneity"])
    summary["grad_noise"] = task.grad_noise(theta_ref)
    summary["measured_at"] = "theta_star" if optimum is not None else "final_model"
    bs = build.batch_size(cfg)
    summary["grad_noise_batch"] = 0.0 if bs is None else summary["grad_noise"] / bs
    if optimum is not None:
        summary["solver"] = {"grad_norm": optimum.grad_norm, "iterations": optimum.iterations, "converged": optimum.converged}
    if topology is not None:
        summary["topology"] = topology.describe()
        summary["spectral_gap"] = summary["topology"]["spectral_gap"]
    return rows, summary


def _read_rows(path: Path) -> list[dict]:
    def num(v: str):
        for kind in (int, float):
            try:
                return kind(v)
            except ValueError:
                pass
        return v

    with open(path, newline="") as f:
        return [{k: (num(v) if k not in ("run", "algorithm") else v) for k, v in r.items()} for r in csv.DictReader(f)]


def _config_toml(cfg: Config) -> str:
    table = cfg.to_dict()
    if not table["sweep"]:
        del table["sweep"]
    return tomli_w.dumps(table)


def run_experiment(cfg: Config, out_dir: str | Path, *, resume: bool = False, progress: bool = True) -> Path:
    """Run every combination of the config's sweep into ``out_dir``; returns the directory."""
    out = Path(out_dir)
    runs = expand(cfg)
    for run_cfg in runs.values():  # refuse bad topologies (disconnected, bad W) before any work
        build.build_topology(run_cfg)
        build.device(run_cfg)
    config_text = _config_toml(cfg)
    rows: list[dict] = []
    summary: dict[str, Any] = {"data": DATA_NOTE, "engine": cfg.engine.name, "runs": {}}
    if (out / "summary.json").exists():
        if not resume:
            raise ConfigError(f"run directory {out} already holds results; pass --resume to continue it or choose another --out")
        if (out / "config.toml").read_text() != config_text:
            raise ConfigError(f"cannot resume {out}: its config.toml differs from this config")
        summary = json.loads((out / "summary.json").read_text())
        rows = [r for r in _read_rows(out / "metrics.csv") if r["run"] in summary["runs"]]
    write_text_atomic(out / "config.toml", config_text)
    cache = _Cache()
    for label, run_cfg in runs.items():
        if label in summary["runs"]:
            continue
        run_rows, run_summary = run_one(run_cfg, label, cache, progress=progress)
        rows += run_rows
        summary["runs"][label] = run_summary
        write_csv_atomic(out / "metrics.csv", rows, COLUMNS)
        write_json_atomic(out / "summary.json", summary)
    from distdpo.plots import plot_run_directory

    plot_run_directory(rows, out)
    return out


def format_summary(summary: dict) -> str:
    """A small aligned table of the final metrics of each run."""
    cols = [("global_loss", "loss"), ("optimality_gap", "gap"), ("grad_norm_sq", "|grad|^2"),
            ("consensus_distance", "consensus"), ("pref_accuracy", "pref_acc"), ("true_pref_accuracy", "true_acc"),
            ("wall_time_s", "time_s")]
    width = max([len(k) for k in summary["runs"]] + [3])
    lines = [f"{'run':<{width}}  " + "  ".join(f"{h:>10}" for _, h in cols)]
    for label, s in summary["runs"].items():
        vals = []
        for key, _ in cols:
            v = s["final"].get(key)
            vals.append(f"{'-':>10}" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:>10.4g}")
        lines.append(f"{label:<{width}}  " + "  ".join(vals))
    return "\n".join(lines)

