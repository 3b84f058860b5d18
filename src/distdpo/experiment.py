"""Run a config (and its sweep) in the simulator into a run directory.

The directory holds ``config.toml`` (resolved), ``metrics.csv`` (one row per
round per run, round 0 = before training), ``summary.json`` and PNG plots.
Files are rewritten atomically after every finished run, so an interrupted
sweep keeps what it finished and ``--resume`` continues from there.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any

import tomli_w
import torch

from distdpo import build, rundir
from distdpo.config import Config, ConfigError, expand
from distdpo.fingerprint import mismatch
from distdpo.io import file_name, write_csv_atomic, write_json_atomic, write_text_atomic
from distdpo.lm.export import exporting_to
from distdpo.metrics import COLUMNS, RunDiverged
from distdpo.solver import solve_centralized

log = logging.getLogger("distdpo")

ENGINE_NOTES = {
    "simulation": "all clients simulated in one process",
    "torchdist": "clients placed on torch.distributed ranks",
    "flower": "clients run as Flower ClientApps",
}


def describe_data(cfg: Config) -> str:
    """What the numbers of a run directory come from, said plainly (synthetic or real, simulated or not)."""
    if cfg.data.source == "synthetic":
        data = "synthetic personalized Bradley–Terry preferences with known per-user rewards (not human data)"
    elif cfg.data.source == "local":
        data = f"human preference data in per-site files ({cfg.data.site_data or 'named by each SuperNode'})"
        if cfg.engine.name == "simulation":
            data += ", every site's files read by this one process (a simulation of per-site data)"
    else:
        data = f"human preference data from {cfg.data.source} (format {cfg.data.format}, split {cfg.data.partition})"
    return f"{data}; {ENGINE_NOTES.get(cfg.engine.name, cfg.engine.name)}"


class Cache:
    """Tasks and f★ shared by the runs of a sweep that use the same data, policy and weighting."""

    def __init__(self):
        self.tasks: dict[tuple, Any] = {}
        self.optima: dict[tuple, Any] = {}
        self.fingerprints: dict[tuple, dict] = {}

    def task(self, cfg: Config):
        key = build.task_key(cfg)
        if key not in self.tasks:
            self.tasks[key] = build.build_task(cfg)
        return self.tasks[key]

    def fingerprint(self, cfg: Config) -> dict:
        """The (data, model) fingerprint of ``cfg``'s task (see :mod:`distdpo.fingerprint`)."""
        key = build.task_key(cfg)
        if key not in self.fingerprints:
            self.fingerprints[key] = self.task(cfg).fingerprint()
        return self.fingerprints[key]

    def optimum(self, cfg: Config, task, weights: torch.Tensor):
        key = (build.task_key(cfg), tuple(weights.tolist()))
        if key not in self.optima:
            self.optima[key] = solve_centralized(task, weights) if task.convex else None
        return self.optima[key]


def run_one(cfg: Config, label: str, cache: Cache | None = None, *, progress: bool = True) -> tuple[list[dict], dict]:
    """Train one configuration with its engine; returns its metric rows and its summary entry."""
    from distdpo.engines import runner

    cache = cache or Cache()
    try:
        rows, summary = runner(cfg.engine.name)(cfg, label, cache, progress=progress)
    except RunDiverged as e:  # stopped and recorded, not raised: the sweep goes on, the exit code says so
        rows, summary = e.rows, e.summary
    if summary:  # (torchdist ranks other than 0 return none)
        summary["fingerprint"] = cache.fingerprint(cfg)  # a resume checks that the data and model are still these
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
        rundir.claim(out, "run")  # refuses a file, anyone else's files, and a second writer
        rows: list[dict] = []
        summary: dict[str, Any] = {"data": describe_data(cfg), "engine": cfg.engine.name, "runs": {}}
        if (out / "summary.json").exists():
            if not resume:
                raise ConfigError(
                    f"run directory {out} already holds results; pass --resume to continue it or choose another --out"
                )
            summary, rows = _resumable(out, config_text)
        return summary, rows

    summary, rows = torchdist.on_rank0(previous) if distributed else previous()
    cache = Cache()
    for run_cfg in runs.values():  # every sweep point is checked before the first one trains
        if build.data_stays_at_sites(run_cfg):  # the sites' count, from the config: no process reads every site
            from distdpo.data.sites import site_files

            if run_cfg.engine.name != "flower":  # (Flower: federated, its SuperNodes name their sites)
                build.build_topology(run_cfg, len(site_files(run_cfg)))
            continue
        build.build_topology(run_cfg, cache.task(run_cfg).num_clients)  # (the task checks clients_per_round)
    if writer:
        write_text_atomic(out / "config.toml", config_text)
    said: set[str] = set()
    for label, run_cfg in runs.items():
        if label in summary["runs"] and build.data_stays_at_sites(run_cfg):
            continue  # finished; its checkpoint checked every site's data fingerprint when it resumed
        if label in summary["runs"]:
            changed = mismatch(
                summary["runs"][label].get("fingerprint"), cache.fingerprint(run_cfg), f"run {label!r} in {out}"
            )
            if changed:
                raise ConfigError(f"cannot resume: {changed}; rerun into a new --out")
            continue
        try:
            with exporting_to(out / "models"):
                run_rows, run_summary = run_one(run_cfg, label, cache, progress=progress)
        except (RuntimeError, FloatingPointError) as e:  # this run broke (a library error, memory): record it, go on
            if distributed:
                raise  # the other ranks cannot know; torchdist reports failures itself
            run_rows, run_summary = (
                [],
                {
                    "status": "failed",
                    "error": f"{type(e).__name__}: {e}",
                    "algorithm": run_cfg.algorithm.name,
                    "engine": run_cfg.engine.name,
                    "final": {},
                },
            )
        notes = build.warnings_for(run_cfg, cache.task(run_cfg))
        if notes and run_summary:
            run_summary["warnings"] = notes
            summary["warnings"] = sorted(set(summary.get("warnings", [])) | set(notes))
            for note in notes:
                if note not in said and writer:
                    said.add(note)
                    log.warning(note)
        if run_summary and (out / "models" / file_name(label)).is_dir():
            run_summary["model_dir"] = f"models/{file_name(label)}"
        rows += run_rows
        summary["runs"][label] = run_summary
        if writer:
            columns = COLUMNS + sorted({k for r in rows for k in r} - set(COLUMNS))
            write_csv_atomic(out / "metrics.csv", rows, columns)
            write_json_atomic(out / "summary.json", summary)
    if writer:
        from distdpo.plots import plot_run_directory

        plot_run_directory(rows, out)
        rundir.release(out)
    return out


def _resumable(out: Path, config_text: str) -> tuple[dict[str, Any], list[dict]]:
    """The summary and rows of a run directory to resume; a missing or damaged file is refused by name."""

    def damaged(name: str, why: str) -> ConfigError:
        return ConfigError(f"cannot resume {out}: {name} {why}; rerun into a new --out")

    try:
        if (out / "config.toml").read_text() != config_text:
            raise ConfigError(f"cannot resume {out}: its config.toml differs from this config")
    except FileNotFoundError:
        raise damaged("config.toml", "is missing") from None
    try:
        summary = json.loads((out / "summary.json").read_text())
    except ValueError as e:
        raise damaged("summary.json", f"is not valid JSON ({e})") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("runs"), dict):
        raise damaged("summary.json", "has no 'runs' table")
    try:
        rows = [r for r in _read_rows(out / "metrics.csv") if r["run"] in summary["runs"]]
    except FileNotFoundError:
        raise damaged("metrics.csv", "is missing") from None
    except (KeyError, ValueError, csv.Error) as e:
        raise damaged("metrics.csv", f"cannot be read as distdpo's metrics ({type(e).__name__}: {e})") from None
    missing = [label for label in summary["runs"] if not any(r["run"] == label for r in rows)]
    if missing:
        raise damaged("metrics.csv", f"has no rows for the finished run(s) {', '.join(map(repr, missing))}")
    return summary, rows


def format_summary(summary: dict) -> str:
    """A small aligned table of the final metrics of each run."""
    cols = [
        ("global_loss", "loss"),
        ("optimality_gap", "gap"),
        ("grad_norm_sq", "|grad|^2"),
        ("consensus_distance", "consensus"),
        ("pref_accuracy", "pref_acc"),
        ("true_pref_accuracy", "true_acc"),
        ("wall_time_s", "time_s"),
    ]
    width = max([len(k) for k in summary["runs"]] + [3])
    lines = [f"{'run':<{width}}  " + "  ".join(f"{h:>10}" for _, h in cols)]
    for label, s in summary["runs"].items():
        vals = []
        for key, _ in cols:
            v = s["final"].get(key)
            vals.append(f"{'-':>10}" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:>10.4g}")
        status = s.get("status", "ok")
        lines.append(f"{label:<{width}}  " + "  ".join(vals) + ("" if status == "ok" else f"  [{status}]"))
    return "\n".join(lines)
