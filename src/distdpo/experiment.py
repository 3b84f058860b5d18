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
from pathlib import Path
from typing import Any

import tomli_w
import torch

from distdpo import build
from distdpo.config import Config, ConfigError, expand
from distdpo.io import write_csv_atomic, write_json_atomic, write_text_atomic
from distdpo.metrics import COLUMNS
from distdpo.solver import solve_centralized

ENGINE_NOTES = {
    "simulation": "all clients simulated in one process",
    "torchdist": "clients placed on torch.distributed ranks",
    "flower": "clients run as Flower ClientApps",
}


def describe_data(cfg: Config) -> str:
    """What the numbers of a run directory come from, said plainly (synthetic or real, simulated or not)."""
    if cfg.data.source == "synthetic":
        data = "synthetic personalized Bradley–Terry preferences with known per-user rewards (not human data)"
    else:
        data = f"human preference data from {cfg.data.source} (format {cfg.data.format}, split {cfg.data.partition})"
    return f"{data}; {ENGINE_NOTES.get(cfg.engine.name, cfg.engine.name)}"


class Cache:
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


def run_one(cfg: Config, label: str, cache: Cache | None = None, *, progress: bool = True) -> tuple[list[dict], dict]:
    """Train one configuration with its engine; returns its metric rows and its summary entry."""
    from distdpo.engines import runner

    return runner(cfg.engine.name)(cfg, label, cache or Cache(), progress=progress)


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
        if build.num_clients_known(run_cfg):
            build.build_topology(run_cfg)
        build.device(run_cfg)
    config_text = _config_toml(cfg)
    distributed = any(c.engine.name == "torchdist" for c in runs.values())
    if distributed:  # rank 0 alone reads and writes the run directory; the other ranks follow its decisions
        from distdpo.engines import torchdist

        torchdist.init(cfg)
    writer = not distributed or torchdist.rank() == 0

    def previous() -> tuple[dict[str, Any], list[dict]]:
        rows: list[dict] = []
        summary: dict[str, Any] = {"data": describe_data(cfg), "engine": cfg.engine.name, "runs": {}}
        if (out / "summary.json").exists():
            if not resume:
                raise ConfigError(f"run directory {out} already holds results; pass --resume to continue it or choose another --out")
            if (out / "config.toml").read_text() != config_text:
                raise ConfigError(f"cannot resume {out}: its config.toml differs from this config")
            summary = json.loads((out / "summary.json").read_text())
            rows = [r for r in _read_rows(out / "metrics.csv") if r["run"] in summary["runs"]]
        return summary, rows

    summary, rows = torchdist.on_rank0(previous) if distributed else previous()
    if writer:
        write_text_atomic(out / "config.toml", config_text)
    cache = Cache()
    for label, run_cfg in runs.items():
        if label in summary["runs"]:
            continue
        run_rows, run_summary = run_one(run_cfg, label, cache, progress=progress)
        rows += run_rows
        summary["runs"][label] = run_summary
        if writer:
            columns = COLUMNS + sorted({k for r in rows for k in r} - set(COLUMNS))
            write_csv_atomic(out / "metrics.csv", rows, columns)
            write_json_atomic(out / "summary.json", summary)
    if writer:
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

