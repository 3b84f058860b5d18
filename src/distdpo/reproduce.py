"""``distdpo reproduce``: the paper's experiments and claims as measurements, in one command.

A *dataset* is a base config (its ``data`` and ``policy`` sections plus the
step size that suits it) and the experiments it supports; the suite builds
every experiment's configs on top of it, runs them over seeds with
:func:`distdpo.experiment.run_one` (one shared :class:`~distdpo.experiment.Cache`,
so runs on the same data share the task and f★), fits the dependences the
theory predicts (log-log least squares, CI = stderr × t-quantile), and writes

* ``report.html`` (self-contained, figures embedded) and ``report.md`` (+ ``figures/*.png``),
* ``metrics.csv`` (every round of every run, with ``experiment``, ``group``, ``x``, ``seed`` columns),
* ``summary.json`` (every run's summary and config, the fits, the claim table, the theory instance).

Experiments: A (centralized vs FedAvg full / partial vs DSGD ring), B1 local
steps E, B2 participation S, B3 topologies and spectral gap, B4 staleness
q_max, B5 heterogeneity ζ², number of clients, drift correction.
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from distdpo import rundir
from distdpo.config import ConfigError, from_dict
from distdpo.experiment import Cache, run_one
from distdpo.fingerprint import mismatch
from distdpo.io import write_csv_atomic, write_json_atomic, write_text_atomic
from distdpo.metrics import COLUMNS
from distdpo.report import Figure, Report, Section, Table, write_report

ZERO_REL = 1e-7  # a floor at or below ZERO_REL × (gap at round 0) is "at the optimum" (float32 runs bottom out near 1e-14)


class DatasetUnavailable(ConfigError):
    """A dataset whose configs this install cannot run yet; the message says what is missing."""


# --------------------------------------------------------------------------- datasets


@dataclass
class Scale:
    """Sizes of the suite for one dataset and mode (quick / full)."""

    rounds: int
    eval_every: int
    batch: int
    local_steps: int  # E of experiments A and B5
    local_steps_sweep: list[int]
    long_factor: int  # B1's longer run: long_factor × rounds
    participation: list[int]
    staleness: list[int]
    topologies: list[str]
    gt_rounds: int
    eps_rel: float
    heterogeneity: list[float] = field(default_factory=list)
    num_clients_sweep: list[int] = field(default_factory=list)
    clients_sweep_pairs: int = 50
    clients_sweep_per_round: int = 10
    full: int | str = "full"  # the "exact gradient" batch; LMs use a minibatch (full passes cost minutes per step)
    dense_eval_every: int = 1  # experiment A's evaluation interval (its curves are drawn round by round)


@dataclass
class Dataset:
    name: str
    description: str
    base: Callable[[bool], dict]  # quick → config table with data + policy (+ algorithm.lr)
    scale: Callable[[bool], Scale]
    experiments: tuple[str, ...]
    synthetic_model: bool = False  # data.heterogeneity / data.num_clients / pairs may be overridden
    needs: str = ""  # what a missing workload is called, for the error message
    default_seeds: int = 3
    # B3's noise-driven regime: data with (close to) no heterogeneity, and how the report names it.
    homogeneous_data: dict = field(default_factory=lambda: {"heterogeneity": 0.0})
    homogeneous_text: str = "ζ = 0"


def data_root() -> Path:
    """Where the shared preference data lives: $DISTDPO_DATA_DIR, else ../shared/data from here or from the repo."""
    env = os.environ.get("DISTDPO_DATA_DIR")
    if env:
        return Path(env)
    for cand in (Path.cwd() / ".." / "shared" / "data", Path(__file__).resolve().parents[3] / ".." / "shared" / "data"):
        if cand.is_dir():
            return cand.resolve()
    return Path("../shared/data")


def _synthetic_base(quick: bool) -> dict:
    data = ({"num_clients": 8, "pairs_per_client": 60, "eval_pairs_per_client": 30, "dim": 6, "num_actions": 4}
            if quick else {"num_clients": 16, "pairs_per_client": 200, "eval_pairs_per_client": 100, "dim": 16, "num_actions": 8})
    data.update(source="synthetic", heterogeneity=2.0)
    return {"data": data, "policy": {"kind": "loglinear", "beta": 1.0, "loss_type": "sigmoid"}, "algorithm": {"lr": 0.5}}


def _synthetic_scale(quick: bool) -> Scale:
    if quick:
        return Scale(rounds=200, eval_every=4, batch=8, local_steps=3, local_steps_sweep=[1, 2, 3, 6], long_factor=3,
                     participation=[1, 2, 4, 8], staleness=[0, 2, 5],
                     topologies=["path", "ring", "star", "torus", "exponential", "complete"],
                     gt_rounds=300, eps_rel=1e-4, heterogeneity=[1.0, 2.0, 4.0], num_clients_sweep=[8, 32, 128],
                     clients_sweep_pairs=30, clients_sweep_per_round=4)
    return Scale(rounds=400, eval_every=4, batch=8, local_steps=5, local_steps_sweep=[1, 2, 3, 6, 12], long_factor=3,
                 participation=[1, 2, 3, 5, 8, 12, 16], staleness=[0, 1, 2, 3, 5],
                 topologies=["path", "ring", "star", "torus", "erdos_renyi", "exponential", "complete"],
                 gt_rounds=800, eps_rel=1e-6, heterogeneity=[0.5, 1.0, 2.0, 4.0],
                 num_clients_sweep=[10, 100, 1000], clients_sweep_pairs=50, clients_sweep_per_round=10)


def _lm_base(path: str, data: dict, lr: float) -> Callable[[bool], dict]:
    def base(quick: bool) -> dict:
        return {
            "data": {"source": str(data_root() / path), **data, "max_pairs": 160 if quick else 800, "eval_fraction": 0.15,
                     "loss_pairs_per_client": 4 if quick else 8},
            "policy": {"kind": "causal_lm", "model": "builtin:gpt2-tiny", "beta": 0.1, "max_length": 96 if quick else 192,
                       "lora_r": 8},
            # Plain SGD on the adapter (what the theory analyses), at the dataset's calibrated step size.
            "algorithm": {"lr": lr, "optimizer": "sgd"},
        }
    return base


def _lm_scale(quick: bool) -> Scale:
    # Sized so that a full run with the default 2 seeds takes about 15 minutes on 2 CPU cores (~110 pair gradients/s
    # at 192 tokens; measured: HH 824 s, PandaLM 922 s).
    if quick:
        return Scale(rounds=6, eval_every=2, batch=4, local_steps=2, local_steps_sweep=[1, 3], long_factor=2,
                     participation=[1, 2, 4], staleness=[0, 2], topologies=["path", "ring", "star", "complete"],
                     gt_rounds=0, eps_rel=1e-2, full=8)
    # No gradient-tracking runs (gt_rounds = 0): their only use is rounds to ε, which needs f★.
    return Scale(rounds=16, eval_every=4, batch=4, local_steps=2, local_steps_sweep=[1, 3, 6], long_factor=2,
                 participation=[1, 2, 4, 8], staleness=[0, 2, 5],
                 topologies=["path", "ring", "star", "complete", "torus", "erdos_renyi", "exponential"],
                 gt_rounds=0, eps_rel=1e-2, full=8, dense_eval_every=2)


# LM step sizes, calibrated with FedAvg (E = 2, B = 4, 16 rounds): the largest tried whose loss falls without spikes.
# HH: at 0.5 the loss only reaches 0.689, at 2 it reaches 0.684, at 5 it overshoots to 0.72, at 20 it diverges.
# PandaLM (‖∇f‖² ~10× larger at the start): at 0.5 the loss falls smoothly to 0.668, at 1 it spikes to 0.74, at 2 to 0.91.
HH_LR, PANDALM_LR = 2.0, 0.5

_LM_DATASET = dict(needs="the language-model workload (data.source = a preference file, policy.kind = 'causal_lm', policy.model)",
                   default_seeds=2, homogeneous_data={"partition": "iid"}, homogeneous_text="IID split, ζ ≈ 0")


DATASETS: dict[str, Dataset] = {
    "synthetic": Dataset(
        "synthetic", "synthetic personalized Bradley–Terry preferences with known per-user rewards (log-linear policy, f★ known)",
        _synthetic_base, _synthetic_scale, ("A", "B1", "B2", "B3", "B4", "B5"), synthetic_model=True,
    ),
    "hh-rlhf": Dataset(
        "hh-rlhf", "Anthropic HH-RLHF harmless-base test (2,312 human pairs; Dirichlet(0.5) over dialogue depth into 8 clients), built-in small causal LM",
        _lm_base("hh-rlhf/harmless-base-test.jsonl.gz", {"format": "hh-rlhf", "partition": "dirichlet", "label_column": "turns",
                                                          "dirichlet_alpha": 0.5, "num_clients": 8}, HH_LR), _lm_scale, ("A", "B1", "B2", "B3", "B4"),
        **_LM_DATASET,
    ),
    "pandalm": Dataset(
        "pandalm", "PandaLM test set (human votes of 3 annotators, Dirichlet(0.5) over annotator into 8 clients), built-in small causal LM",
        _lm_base("pandalm/testset-v1.json", {"format": "pandalm", "pandalm_mode": "votes", "partition": "dirichlet",
                                               "label_column": "annotator", "dirichlet_alpha": 0.5, "num_clients": 8}, PANDALM_LR),
        _lm_scale, ("A", "B1", "B2", "B3", "B4"),
        **_LM_DATASET,
    ),
}


def dataset_base(name: str, quick: bool) -> dict:
    """The dataset's base table, validated; a dataset this install cannot run raises :class:`DatasetUnavailable`."""
    if name not in DATASETS:
        raise ConfigError(f"--dataset must be one of {', '.join(DATASETS)}, got {name!r}")
    ds = DATASETS[name]
    table = ds.base(quick)
    src = table["data"].get("source", "synthetic")
    if src != "synthetic" and not Path(src).exists():
        raise DatasetUnavailable(f"dataset {name!r}: data file {src} not found (set DISTDPO_DATA_DIR to the folder holding {Path(src).parent.name}/)")
    try:
        from_dict(_with_engine(table))
    except ConfigError as e:
        if ds.needs:
            raise DatasetUnavailable(
                f"dataset {name!r} needs {ds.needs}, which this install does not accept yet: {e}. "
                f"Its base config is data.source = {src!r}, policy.kind = {table['policy'].get('kind')!r}, "
                f"policy.model = {table['policy'].get('model')!r}; use --dataset synthetic meanwhile"
            ) from None
        raise
    return table


def _with_engine(table: dict) -> dict:
    t = copy.deepcopy(table)
    t.setdefault("engine", {})["progress"] = False
    return t


# --------------------------------------------------------------------------- run specs


@dataclass
class Spec:
    experiment: str
    group: str  # one curve / one series
    x: float  # the swept level (NaN when none)
    seed: int
    table: dict
    label: str = ""
    result_rows: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    seconds: float = math.nan  # training + evaluation time of this run
    reused: bool = False  # finished by an earlier, interrupted call (--resume)


def _canonical(table: dict) -> str:
    return json.dumps(table, sort_keys=True)


_RUN_RECORD_KEYS = {"label", "table", "rows", "summary", "seconds"}


def finished_runs(out: Path, resume: bool) -> dict[str, dict]:
    """The run records an earlier call left in out/runs/, by label; a directory with results needs ``resume``."""
    rundir.claim(out, "reproduce")  # refuses anyone else's files and a second writer
    files = sorted((out / "runs").glob("*.json"))
    if (files or (out / "summary.json").exists()) and not resume:
        raise ConfigError(f"{out} already holds results; pass --resume to continue it or choose another --out")
    done = {}
    for f in files:
        try:
            rec = json.loads(f.read_text())
        except json.JSONDecodeError as e:  # writes are atomic, so this is a foreign or edited file
            raise ConfigError(f"cannot resume {out}: {f.name} is not JSON ({e})") from None
        if not isinstance(rec, dict) or not _RUN_RECORD_KEYS <= rec.keys():
            raise ConfigError(f"cannot resume {out}: {f.name} is not a run record (needs {', '.join(sorted(_RUN_RECORD_KEYS))})")
        done[rec["label"]] = rec
    return done


def _merge(base: dict, **sections) -> dict:
    t = copy.deepcopy(base)
    for name, values in sections.items():
        t.setdefault(name, {}).update(values)
    return t


def _fit_topology(table: dict) -> dict:
    """An Erdős–Rényi draw can be disconnected for some seed: raise er_p until it connects."""
    if table.get("topology", {}).get("graph") != "erdos_renyi":
        return table
    from distdpo import build

    n = table["data"].get("num_clients", 16)
    p = min(1.0, 2 * math.log(n) / n)
    for _ in range(20):
        table["topology"]["er_p"] = p
        try:
            build.build_topology(from_dict(table))
            return table
        except ConfigError:
            p = min(1.0, p * 1.25)
    return table


def build_specs(ds: Dataset, quick: bool, seeds: int) -> tuple[list[Spec], Scale, dict]:
    """Every run of the suite, for every seed."""
    sc = ds.scale(quick)
    base = _with_engine(ds.base(quick))
    n = base["data"].get("num_clients", 16)
    R, ev, B, E = sc.rounds, sc.eval_every, sc.batch, sc.local_steps
    specs: list[Spec] = []

    def add(exp, group, x, table):
        for s in range(seeds):
            t = _merge(table)
            t["seed"] = s
            specs.append(Spec(exp, group, float(x), s, _fit_topology(t)))

    alg = lambda **kw: {"rounds": R, **kw}  # noqa: E731
    eng = lambda every=ev: {"eval_every": every, "progress": False}  # noqa: E731
    dense = sc.dense_eval_every
    if "A" in ds.experiments:
        mb = {"batch_size": B, "local_steps": E}
        add("A", "centralized", math.nan, _merge(base, algorithm=alg(name="centralized", **{**mb, "batch_size": B * n}), engine=eng(dense)))
        add("A", "FedAvg full (S=n)", math.nan, _merge(base, algorithm=alg(name="fedavg", **mb), engine=eng(dense)))
        add("A", f"FedAvg partial (S={max(1, n // 4)})", math.nan,
            _merge(base, algorithm=alg(name="fedavg", clients_per_round=max(1, n // 4), **mb), engine=eng(dense)))
        add("A", "DSGD ring", math.nan, _merge(base, algorithm=alg(name="dsgd", **mb), topology={"graph": "ring"}, engine=eng(dense)))
    if "B1" in ds.experiments:
        for e in sc.local_steps_sweep:
            add("B1", f"E={e}", e, _merge(base, algorithm={"name": "fedavg", "rounds": R * sc.long_factor, "local_steps": e,
                                                            "batch_size": sc.full}, engine=eng(ev * 2)))
    if "B2" in ds.experiments:
        for S in sc.participation:
            if S <= n:
                add("B2", f"S={S}", S, _merge(base, algorithm=alg(name="fedavg", local_steps=1, batch_size=sc.full,
                                                                  clients_per_round=S), engine=eng()))
    if "B3" in ds.experiments:
        for g in sc.topologies:
            add("B3", f"heterogeneity/{g}", math.nan, _merge(base, algorithm=alg(name="dsgd", local_steps=1, batch_size=sc.full),
                                                              topology={"graph": g}, engine=eng()))
            add("B3", f"noise/{g}", math.nan, _merge(base, data=ds.homogeneous_data, algorithm=alg(name="dsgd", local_steps=1, batch_size=B),
                                                      topology={"graph": g}, engine=eng()))
            if not sc.gt_rounds:
                continue  # no rounds-to-ε measurement, the tracking runs' only use
            add("B3", f"tracking/{g}", math.nan, _merge(base, algorithm={"name": "gradient_tracking", "rounds": sc.gt_rounds,
                                                                         "local_steps": 1, "batch_size": sc.full},
                                                         topology={"graph": g}, engine=eng(max(1, ev // 2))))
    if "B4" in ds.experiments:
        for q in sc.staleness:
            add("B4", f"q_max={q}", q, _merge(base, algorithm=alg(name="fedavg", local_steps=max(2, E - 2), batch_size=B,
                                                                  staleness=q), engine=eng()))
        q = max(sc.staleness)
        add("B4", f"full batch q_max={q}", q, _merge(base, algorithm=alg(name="fedavg", local_steps=1, batch_size=sc.full,
                                                                         staleness=q), engine=eng()))
    if "B5" in ds.experiments and ds.synthetic_model:
        S = max(1, n // 4)
        for h in sc.heterogeneity:
            d = {"heterogeneity": h}
            add("B5", "FedAvg", h, _merge(base, data=d, algorithm=alg(name="fedavg", local_steps=E + 1, batch_size=sc.full), engine=eng()))
            add("B5", f"FedAvg S={S}", h, _merge(base, data=d, algorithm=alg(name="fedavg", local_steps=1, batch_size=sc.full,
                                                                            clients_per_round=S), engine=eng()))
            add("B5", "SCAFFOLD", h, _merge(base, data=d, algorithm=alg(name="scaffold", local_steps=E + 1, batch_size=sc.full), engine=eng()))
            add("B5", "DSGD ring", h, _merge(base, data=d, algorithm=alg(name="dsgd", local_steps=1, batch_size=sc.full),
                                             topology={"graph": "ring"}, engine=eng()))
            add("B5", "gradient tracking ring", h, _merge(base, data=d, algorithm=alg(name="gradient_tracking", local_steps=1,
                                                                                       batch_size=sc.full),
                                                          topology={"graph": "ring"}, engine=eng()))
        for m in sc.num_clients_sweep:
            d = {"num_clients": m, "pairs_per_client": sc.clients_sweep_pairs, "eval_pairs_per_client": 20, "heterogeneity": 1.0}
            add("B5n", "FedAvg full participation", m, _merge(base, data=d, algorithm=alg(name="fedavg", local_steps=1, batch_size=B),
                                                              engine=eng(max(ev, 10))))
            add("B5n", f"FedAvg S={sc.clients_sweep_per_round}", m,
                _merge(base, data=d, algorithm=alg(name="fedavg", local_steps=1, batch_size=B,
                                                   clients_per_round=min(m, sc.clients_sweep_per_round)), engine=eng(max(ev, 10))))
    for s in specs:
        level = "" if math.isnan(s.x) else f"/x={s.x:g}"
        s.label = f"{s.experiment}/{s.group}{level}/seed={s.seed}"
    return specs, sc, base


# --------------------------------------------------------------------------- statistics


def fit_loglog(x, y, predicted: float | None = None) -> dict[str, Any]:
    """Least squares of log y on log x over the finite, positive points: slope, its 95% CI (stderr × t), R²."""
    from scipy import stats

    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    lx, ly = np.log(x[ok]), np.log(y[ok])
    out: dict[str, Any] = {"n": int(ok.sum()), "predicted": predicted}
    if ok.sum() < 3 or np.ptp(lx) == 0:
        out.update(slope=math.nan, lo=math.nan, hi=math.nan, intercept=math.nan, r2=math.nan)
        return out
    r = stats.linregress(lx, ly)
    half = float(r.stderr * stats.t.ppf(0.975, ok.sum() - 2))
    out.update(slope=float(r.slope), lo=float(r.slope - half), hi=float(r.slope + half), intercept=float(r.intercept),
               r2=float(r.rvalue**2))
    return out


def verdict(fit: dict) -> str:
    """holds: predicted exponent in the CI and the slope significant; direction only: right sign, other exponent."""
    s, lo, hi, p = fit["slope"], fit["lo"], fit["hi"], fit["predicted"]
    if not math.isfinite(s):
        return "inconclusive (too few points)"
    significant = lo > 0 or hi < 0
    if lo <= p <= hi:
        return "holds" if significant or p == 0 else "inconclusive (CI includes 0)"
    if significant and np.sign(s) == np.sign(p):
        return "direction only (exponent differs)"
    if p == 0:
        return "does not hold"
    return "does not hold" if significant or np.sign(s) != np.sign(p) else "inconclusive (CI includes 0)"


def _fmt(v, digits=3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, (int, np.integer)):
        return str(v)
    return f"{v:.{digits}g}"


def _fit_text(f: dict) -> str:
    return f"{_fmt(f['slope'])} [{_fmt(f['lo'])}, {_fmt(f['hi'])}], R²={_fmt(f['r2'], 2)}, n={f['n']}"


# --------------------------------------------------------------------------- suite


@dataclass
class Claim:
    experiment: str
    claim: str
    predicted: str
    measured: str
    verdict: str
    regime: str
    exact: bool = False  # tests a zero floor, which only exact (full-batch) gradients can show

    def row(self) -> list[str]:
        return [self.experiment, self.claim, self.predicted, self.measured, self.verdict, self.regime]


class Suite:
    """Runs the specs and turns their rows into figures, fits and claims."""

    def __init__(self, dataset: str = "synthetic", *, seeds: int = 3, quick: bool = False, progress: bool = True):
        self.ds = DATASETS[dataset] if dataset in DATASETS else None
        dataset_base(dataset, quick)  # validates; raises DatasetUnavailable with what is missing
        self.dataset, self.seeds, self.quick, self.progress = dataset, seeds, quick, progress
        self.specs, self.scale, self.base = build_specs(self.ds, quick, seeds)
        self.cache = Cache()
        if self.ds.needs:  # build the first task now: a workload that is not installed fails here, saying what is missing
            try:
                self.cache.task(from_dict(self.specs[0].table))
            except (ImportError, NotImplementedError, ConfigError) as e:
                raise DatasetUnavailable(
                    f"dataset {dataset!r} needs {self.ds.needs}; building its task failed: {type(e).__name__}: {e}. "
                    "Use --dataset synthetic meanwhile"
                ) from None
        self.claims: list[Claim] = []
        self.fits: dict[str, dict] = {}
        self.sections: list[Section] = []
        self.theory: dict[str, Any] = {}
        self.failed: list[tuple[str, str]] = []
        self.failed_analyses: dict[str, str] = {}

    # ---- running

    def run(self, out: Path | None = None, done: dict[str, dict] | None = None) -> None:
        """Train every spec not in ``done`` (see :func:`finished_runs`); with ``out``, each finished run is kept in
        out/runs/ as it completes."""
        from tqdm.auto import tqdm

        done = done or {}
        bar = tqdm(self.specs, desc=f"reproduce {self.dataset}", unit="run", disable=None if self.progress else True)
        for i, spec in enumerate(bar):
            bar.set_postfix_str(spec.label[:40])
            if spec.label in done and _canonical(done[spec.label]["table"]) == _canonical(spec.table):
                rec = done[spec.label]
                changed = mismatch(rec["summary"].get("fingerprint"), self.cache.fingerprint(from_dict(spec.table)),
                                   f"the run record of {spec.label!r}")
                if changed:
                    raise ConfigError(f"cannot resume: {changed}; rerun into a new --out")
                spec.result_rows, spec.summary, spec.seconds, spec.reused = rec["rows"], rec["summary"], rec["seconds"], True
                continue
            cfg = from_dict(spec.table)
            t0 = time.perf_counter()
            try:
                rows, summary = run_one(cfg, spec.label, self.cache, progress=False)
            except (FloatingPointError, RuntimeError, ValueError) as e:  # one failed run must not lose the others
                self.failed.append((spec.label, f"{type(e).__name__}: {e}"))
                continue
            if summary.get("status") != "ok":  # diverged: its curve would end early; listed, not analysed
                self.failed.append((spec.label, f"{summary['status']}: {summary.get('reason', '')}"))
                continue
            for r in rows:
                r.update(experiment=spec.experiment, group=spec.group, x=spec.x, seed=spec.seed)
            spec.result_rows, spec.summary, spec.seconds = rows, summary, time.perf_counter() - t0
            if out is not None:
                # Python's JSON keeps NaN (not standard JSON, but these records are only read back here).
                write_text_atomic(out / "runs" / f"{i:04d}.json", json.dumps(
                    {"label": spec.label, "table": spec.table, "rows": rows, "summary": summary, "seconds": spec.seconds}))
        bar.close()

    # ---- helpers

    def _metric(self) -> str:
        s = next((sp.summary for sp in self.specs if sp.summary), {})
        return "optimality_gap" if s.get("f_star") is not None else "grad_norm_sq"

    def _metric_label(self) -> str:
        return "f(θ̄) − f★" if self._metric() == "optimality_gap" else "‖∇f(θ̄)‖²"

    def _of(self, experiment: str, group: str | None = None) -> list[Spec]:
        return [s for s in self.specs if s.experiment == experiment and (group is None or s.group == group) and s.result_rows]

    def _groups(self, experiment: str) -> list[str]:
        seen: list[str] = []
        for s in self._of(experiment):
            if s.group not in seen:
                seen.append(s.group)
        return seen

    @staticmethod
    def _series(spec: Spec, column: str, upto: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        rows = [r for r in spec.result_rows if upto is None or r["round"] <= upto]
        return np.array([r["round"] for r in rows], float), np.array([r[column] for r in rows], float)

    @staticmethod
    def _stochastic(spec: Spec) -> bool:
        a = spec.table.get("algorithm", {})
        n = spec.table.get("data", {}).get("num_clients", 16)
        return a.get("batch_size", 32) != "full" or 0 < a.get("clients_per_round", 0) < n

    def _zero(self, spec: Spec) -> float:
        """The level below which a run counts as at the optimum: ZERO_REL × its gap at round 0."""
        return ZERO_REL * self._series(spec, self._metric())[1][0]

    def _tail(self, spec: Spec, column: str | None = None, upto: int | None = None, frac: float | None = None) -> float:
        """A run's floor: the mean of the last half of its evaluated rounds when it is stochastic (averaging the
        noise), of the last tenth when it is deterministic (full batch, every client)."""
        if frac is None:
            frac = 0.5 if self._stochastic(spec) else 0.1
        _, y = self._series(spec, column or self._metric(), upto)
        y = y[1:] if len(y) > 1 else y
        k = max(1, int(round(len(y) * frac)))
        return float(np.mean(y[-k:]))

    def _config_note(self, spec: Spec) -> str:
        t = spec.table
        a, d = t.get("algorithm", {}), t.get("data", {})
        bs = a.get("batch_size", 32)
        parts = [f"{self.dataset}", f"n={d.get('num_clients')}"]
        if self.ds.synthetic_model:
            parts += [f"d={d.get('dim')}", f"ζ-scale={d.get('heterogeneity')}"]
        parts += [f"η={a.get('lr')}", "full batch" if bs == "full" else f"minibatch B={bs}"]
        return ", ".join(parts)

    def _band(self, ax, specs_by_group: dict[str, list[Spec]], column: str, log: bool, upto: int | None = None):
        for g, specs in specs_by_group.items():
            curves = [self._series(s, column, upto) for s in specs]
            if not curves or not len(curves[0][0]):
                continue
            xs = curves[0][0]
            m = min(len(c[1]) for c in curves)
            Y = np.stack([c[1][:m] for c in curves])
            if log:
                Y = np.maximum(Y, 1e-16)
            mean = Y.mean(0)
            (line,) = ax.plot(xs[:m], mean, label=g, linewidth=1.5)
            if len(specs) > 1:
                ax.fill_between(xs[:m], Y.min(0), Y.max(0), color=line.get_color(), alpha=0.2, linewidth=0)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("round")
        ax.grid(True, alpha=0.3)

    def _figure(self, name: str, caption: str, draw, ncols: int = 1, width: float = 6.4, height: float = 4.2) -> Figure:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, ncols, figsize=(width * ncols if ncols > 1 else width, height), squeeze=False)
        draw(fig, list(axes[0]))
        from matplotlib.ticker import NullFormatter

        for ax in axes[0]:
            if ax.get_xscale() == "log":  # minor tick labels of a short log axis overlap
                ax.xaxis.set_minor_formatter(NullFormatter())
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        plt.close(fig)
        return Figure(name, caption, buf.getvalue())

    def _points(self, experiment: str, group: str, xfn=None, yfn=None) -> tuple[np.ndarray, np.ndarray]:
        specs = self._of(experiment, group)
        xs = np.array([xfn(s) if xfn else s.x for s in specs], float)
        ys = np.array([yfn(s) if yfn else self._tail(s) for s in specs], float)
        return xs, ys

    def _scatter_fit(self, ax, x, y, fit, label, xlabel, ylabel, color=None):
        x, y = np.asarray(x, float), np.asarray(y, float)
        keep = (x > 0) & (y > 0)  # what a log-log fit can use; the caption says what is left out
        if not keep.any():
            ax.text(0.5, 0.5, "no positive points to fit", transform=ax.transAxes, ha="center")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            return
        pts = ax.scatter(x[keep], y[keep], label=label, s=18, color=color, alpha=0.8)
        if math.isfinite(fit.get("slope", math.nan)):
            ok = (x > 0) & (y > 0) & np.isfinite(x) & np.isfinite(y)
            xx = np.geomspace(x[ok].min(), x[ok].max(), 50)
            ax.plot(xx, np.exp(fit["intercept"]) * xx ** fit["slope"], color=pts.get_facecolor()[0], linewidth=1,
                    label=f"fit slope {fit['slope']:.2f} (theory {fit['predicted']:g})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        levels = np.unique(x[keep])
        if len(levels) <= 8 and levels.max() / levels.min() < 100:  # a narrow log axis may show no tick at all: label the levels
            ax.set_xticks(levels, [f"{v:.3g}" for v in levels])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(fontsize=7)

    def _claim_fit(self, key, experiment, claim, predicted_text, fit, regime) -> None:
        self.fits[key] = fit
        self.claims.append(Claim(experiment, claim, predicted_text, f"slope {_fit_text(fit)}", verdict(fit), regime))

    def _transient_note(self) -> str:
        """Without f★ (language models) say how far the runs got: short LM runs are measured mid-transient."""
        if self._metric() == "optimality_gap":
            return ""
        specs = self._of("A", "FedAvg full (S=n)")
        if not specs or not specs[0].result_rows:
            return ""
        loss = np.array([self._series(s, "global_loss")[1][[0, -1]] for s in specs])
        g = np.array([self._series(s, "grad_norm_sq")[1][[0, -1]] for s in specs])
        R = self.scale.rounds
        text = (f" With no f★ the claims are measured on ‖∇f‖². In {R} rounds FedAvg (A) takes the loss from "
                f"{_fmt(float(loss[:, 0].mean()), 4)} to {_fmt(float(loss[:, 1].mean()), 4)} and ‖∇f‖² from "
                f"{_fmt(float(g[:, 0].mean()))} to {_fmt(float(g[:, 1].mean()))}")
        if g[:, 1].mean() > g[:, 0].mean():  # LoRA starts at B = 0, where the gradient is small: it grows before it falls
            return text + (": ‖∇f‖² is still above its starting value, so these runs are in their transient, a 'floor' here "
                           "is the level reached after R rounds, and claims about stationary floors are tested outside the "
                           "regime they were derived for.")
        return text + "."

    def _seeds_note(self) -> str:
        return f"mean of {self.seeds} seed{'s' if self.seeds > 1 else ''}" + (", band = min–max over seeds" if self.seeds > 1 else "")

    # ---- analyses

    def analyse_theory(self) -> None:
        from distdpo import build, theory

        spec = next((s for s in self.specs if s.experiment == "B1" and s.result_rows), None) or next(s for s in self.specs if s.result_rows)
        cfg = from_dict(spec.table)
        task = self.cache.task(cfg)
        w = build.client_weights(cfg, task.client_sizes)
        opt = self.cache.optimum(cfg, task, w)
        if getattr(task, "convex", False) and hasattr(task, "objective"):
            self.theory = theory.instance(task, w, opt.theta if opt is not None else None)
        else:
            ref = task.initial_params()
            self.theory = {"num_clients": task.num_clients, "num_params": task.num_params,
                           "heterogeneity_at_reference": theory.heterogeneity(task, w, ref)}
            if hasattr(task, "full_gradient"):
                lam, _ = theory.hessian_top_eigenpair_fd(lambda t: task.full_gradient(t, w), ref)
                self.theory["L_fd_at_reference"] = abs(lam)
            if hasattr(task, "grad_noise"):
                self.theory["grad_noise_at_reference"] = theory.grad_noise(task, ref)
        self.theory["config"] = self._config_note(spec)
        rows = [["quantity", "value", "how"]]
        names = [
            ("L_bound", "L (closed-form bound β²/4·λ_max(Σ p_i/N_i Σ z zᵀ))", "theory.smoothness_bound"),
            ("L_power_at_theta_star", "λ_max(∇²f(θ★)) by power iteration", "theory.hessian_top_eigenvalue (HVPs)"),
            ("L_eig_at_theta_star", "λ_max(∇²f(θ★)) by eigvalsh of the full Hessian", "torch.autograd.functional.hessian"),
            ("L_power_at_reference", "λ_max(∇²f(θ_ref)) by power iteration", "theory.hessian_top_eigenvalue"),
            ("L_fd_at_reference", "|λ|_max(∇²f(θ_ref)) by power iteration on finite-difference HVPs (fixed loss pairs)",
             "theory.hessian_top_eigenpair_fd"),
            ("mu_at_theta_star", "μ = λ_min(∇²f(θ★))", "eigvalsh"),
            ("heterogeneity_at_theta_star", "ζ² at θ★", "theory.heterogeneity"),
            ("heterogeneity_at_reference", "ζ² at θ_ref (start)", "theory.heterogeneity"),
            ("grad_noise", "σ² per pair at θ★", "theory.grad_noise"),
            ("grad_noise_at_reference", "σ² per pair at θ_ref (start)", "theory.grad_noise"),
            ("num_params", "trainable parameters", "task.num_params"),
        ]
        table = [[label, _fmt(self.theory.get(k), 4), how] for k, label, how in names if k in self.theory]
        para = [f"Instance of experiments A/B1 (seed 0): {self.theory['config'].replace(', full batch', '')}. "
                + ("L bounds the curvature everywhere; the power iteration and the full-Hessian eigenvalue must agree with each "
                   "other and stay below the bound." if "L_bound" in self.theory else
                   "No closed-form L exists for a language model: the local curvature at the start is estimated by power "
                   "iteration on finite-difference Hessian-vector products of the gradient on the fixed loss pairs.")]
        topo_rows = []
        for g in self.scale.topologies:
            specs = self._of("B3", f"heterogeneity/{g}")
            if specs and specs[0].summary.get("topology"):
                t = specs[0].summary["topology"]
                topo_rows.append([g, str(t["num_nodes"]), str(t["num_edges"]), _fmt(t["lambda"], 4), _fmt(t["spectral_gap"], 4)])
        sec = Section("Problem instance and theory quantities", para, [Table(rows[0], table)])
        if topo_rows:
            sec.tables.append(Table(["graph", "n", "edges", "λ", "spectral gap 1−λ"], topo_rows,
                                    "Metropolis–Hastings weights; spectral gap = theory.spectral_gap(topology)."))
        self.sections.append(sec)

    def analyse_A(self) -> None:
        groups = {g: self._of("A", g) for g in self._groups("A")}
        if not groups:
            return
        note = self._config_note(groups["FedAvg full (S=n)"][0]) + f", E={self.scale.local_steps}"
        cols = [("global_loss", "global loss f(θ̄)", False), ("grad_norm_sq", "‖∇f(θ̄)‖²", True)]
        if self._metric() == "optimality_gap":
            cols.append(("optimality_gap", "f(θ̄) − f★", True))

        def draw(fig, axes):
            for ax, (c, lab, log) in zip(axes, cols):
                self._band(ax, groups, c, log)
                ax.set_ylabel(lab)
            axes[0].legend(fontsize=7)
            fig.suptitle(f"A · {note} · {self._seeds_note()}", fontsize=9)

        fig = self._figure("a_comparative", f"A. Centralized DPO vs FedDPO (full / partial participation) vs DecDPO on a ring; {note}; "
                           f"{self._seeds_note()}.", draw, ncols=len(cols), width=4.4)

        def draw_het(fig, axes):
            self._band(axes[0], groups, "heterogeneity", True)
            axes[0].set_ylabel("ζ²(θ̄_t)")
            axes[0].legend(fontsize=7)
            axes[0].set_title(f"ζ² along the run · {note}", fontsize=8)

        fig2 = self._figure("a_heterogeneity_along_run", f"ζ²(θ̄_t) = (1/n)Σ‖∇f_i − ∇f‖² along the runs of A; {self._seeds_note()}.", draw_het)
        tails = {g: float(np.mean([self._tail(s) for s in specs])) for g, specs in groups.items()}
        partial = next(g for g in groups if g.startswith("FedAvg partial"))
        full, cen = tails["FedAvg full (S=n)"], tails["centralized"]
        self.claims.append(Claim("A", "full-participation FedDPO matches centralized DPO (same pairs per step)",
                                 "floor ratio FedAvg full / centralized within [1/3, 3]", f"ratio {_fmt(full / cen)}",
                                 "holds" if 1 / 3 <= full / cen <= 3 else "does not hold", "minibatch, tail mean of the last half"))
        self.claims.append(Claim("A", "partial participation and gossip on a ring cost accuracy: floor(FedAvg partial) and "
                                 "floor(DSGD ring) ≥ floor(FedAvg full)", "ordering",
                                 ", ".join(f"{g}: {_fmt(v)}" for g, v in tails.items()),
                                 "holds" if tails[partial] >= full and tails["DSGD ring"] >= full else "does not hold",
                                 "minibatch, tail mean of the last half"))
        table = Table(["method", f"tail mean of {self._metric()}"], [[g, _fmt(v, 4)] for g, v in tails.items()])
        self.sections.append(Section("A. Comparative: centralized vs federated vs decentralized",
                                     ["Same data, same step size, same local steps; centralized DPO takes E steps per round on the "
                                      "pooled data with batch n·B (as many pairs per step as the federation)."],
                                     [table], [fig, fig2]))

    def analyse_B1(self) -> None:
        groups = {g: self._of("B1", g) for g in self._groups("B1")}
        if not groups:
            return
        R, long = self.scale.rounds, self.scale.rounds * self.scale.long_factor
        first = next(iter(groups.values()))[0]
        note = self._config_note(first)
        x, y = self._points("B1", None, xfn=lambda s: s.x - 1, yfn=lambda s: self._tail(s, upto=R))
        y_long = np.array([self._tail(s) for s in self._of("B1")])
        zero = {s.seed: self._zero(s) for s in self._of("B1")}
        fit = fit_loglog(x, y, 2.0)
        self._claim_fit("B1_drift", "B1", "federated floor grows with local steps E (client drift)",
                        "floor ∝ η²(E−1)²ζ² → slope 2 in (E−1)", fit, f"full batch, E ≥ 2, floor at round {R}")
        e1 = [(self._tail(s), self._zero(s)) for s in self._of("B1") if s.x == 1]
        if e1:
            self.claims.append(Claim("B1", "E = 1 full-batch FedAvg (= gradient descent) has no floor",
                                     f"floor = 0 (≤ {ZERO_REL:g}·gap₀)", f"max over seeds {_fmt(max(v for v, _ in e1))} at round {long}",
                                     "holds" if all(v <= z for v, z in e1) else "does not hold", "full batch, longer run",
                                     exact=True))
        ratios = [b / a for s, a, b in zip(self._of("B1"), [self._tail(s, upto=R) for s in self._of("B1")], y_long)
                  if s.x > 1 and a > zero[s.seed]]
        if ratios and long > R:
            stable = all(0.75 <= r <= 1.33 for r in ratios)
            self.claims.append(Claim("B1", f"for E > 1 the gap is a floor, not a transient (round {long} vs {R})", "ratio ≈ 1",
                                     f"ratio min {_fmt(min(ratios))}, max {_fmt(max(ratios))}",
                                     "holds" if stable else "does not hold", "full batch, longer run"))

        def draw(fig, axes):
            self._band(axes[0], groups, self._metric(), True)
            axes[0].axvline(R, color="k", linestyle=":", linewidth=1)
            axes[0].set_ylabel(self._metric_label())
            axes[0].legend(fontsize=7)
            axes[0].set_title(f"B1 · FedAvg · {note} · {self._seeds_note()}", fontsize=8)
            self._scatter_fit(axes[1], x, y, fit, "floor at round R", "E − 1", self._metric_label())
            axes[1].set_title("floor vs E − 1 (log-log)" + ("; E = 1 has no floor" if self.scale.full == "full" else ""), fontsize=8)

        fig = self._figure("b1_local_steps", f"B1. FedAvg with E local steps, full participation, {note}; dotted line = R = {R} "
                           f"(fit), the run continues to {long} (the longer run); {self._seeds_note()}.", draw, ncols=2)
        self.sections.append(Section("B1. Local steps E", [
            "Full batch isolates the deterministic client-drift floor: with E = 1 FedAvg is gradient descent on f and converges "
            "to θ★; with E > 1 the local models drift toward their own optima and the average stops short of θ★."], [], [fig]))

    def analyse_B2(self) -> None:
        groups = {g: self._of("B2", g) for g in self._groups("B2")}
        if not groups:
            return
        n = self.base["data"].get("num_clients", 16)
        note = self._config_note(next(iter(groups.values()))[0]) + ", E=1"
        specs = self._of("B2")
        x = np.array([1 / s.x - 1 / n for s in specs])
        y = np.array([self._tail(s) for s in specs])
        fit = fit_loglog(x, y, 1.0)
        self._claim_fit("B2_participation", "B2", "partial-participation floor ∝ ζ²/S (sampling without replacement)",
                        "floor ∝ η ζ² (1/S − 1/n) → slope 1", fit, "full batch, E = 1, S < n")
        levels = sorted({s.x for s in specs})
        means = [float(np.mean([self._tail(s) for s in specs if s.x == S])) for S in levels]
        self.claims.append(Claim("B2", "gap decreases with S", "monotone in S",
                                 f"floors by S = {', '.join(f'{S:g}' for S in levels)}: {', '.join(_fmt(m) for m in means)}",
                                 "holds" if all(a >= b for a, b in zip(means, means[1:])) else "does not hold",
                                 "full batch, E = 1"))
        full = [(self._tail(s), self._zero(s)) for s in specs if s.x == n]
        if full:
            self.claims.append(Claim("B2", "S = n (every client, exact gradients) has no floor", f"floor(S=n) ≤ {ZERO_REL:g}·gap₀",
                                     f"max over seeds {_fmt(max(v for v, _ in full))}",
                                     "holds" if all(v <= z for v, z in full) else "does not hold", "full batch, E = 1", exact=True))

        def draw(fig, axes):
            self._band(axes[0], groups, self._metric(), True)
            axes[0].set_ylabel(self._metric_label())
            axes[0].legend(fontsize=7)
            axes[0].set_title(f"B2 · FedAvg · {note} · {self._seeds_note()}", fontsize=8)
            inv = np.array([1 / s.x for s in specs])
            axes[1].scatter(inv, np.maximum(y, 1e-16), s=18)
            axes[1].set_xlabel("1/S")
            axes[1].set_ylabel("floor (tail mean)")
            axes[1].set_yscale("log")
            axes[1].grid(True, alpha=0.3)
            axes[1].set_title("floor vs 1/S", fontsize=8)
            self._scatter_fit(axes[2], x, y, fit, "floor", "1/S − 1/n", self._metric_label())
            axes[2].set_title("floor vs 1/S − 1/n (log-log)", fontsize=8)

        fig = self._figure("b2_participation", f"B2. FedAvg sampling S of n = {n} clients per round, {note}; floors are tail means "
                           f"of the last half of the rounds; {self._seeds_note()}.", draw, ncols=3, width=4.4)
        self.sections.append(Section("B2. Participation S", [
            "Each round averages S sampled clients' gradients: an unbiased but noisy estimate of ∇f whose variance is "
            "ζ²(1/S − 1/n)·n/(n−1). At a constant step size this variance sets the floor."], [], [fig]))

    def analyse_B3(self) -> None:
        from distdpo import theory
        from distdpo.topology import make_topology

        topos = [g for g in self.scale.topologies if self._of("B3", f"heterogeneity/{g}")]
        if not topos:
            return
        lr = self.base["algorithm"]["lr"]
        sg = {}
        lam_spec = {}
        for g in topos:
            s = self._of("B3", f"heterogeneity/{g}")[0]
            sg[g] = s.summary["spectral_gap"]
        note_h = self._config_note(self._of("B3", f"heterogeneity/{topos[0]}")[0])
        note_n = self._config_note(self._of("B3", f"noise/{topos[0]}")[0])
        z0 = self.ds.homogeneous_text
        noise_regime = f"minibatch, {z0} (noise-driven)"

        def pts(regime, use):
            specs = [s for g in topos for s in self._of("B3", f"{regime}/{g}") if sg[g] < 1]
            ys = np.array([self._tail(s, "consensus_distance") for s in specs])
            xs = np.array([use(s) for s in specs])
            return xs, ys, specs

        gap_of = lambda s: s.summary["spectral_gap"]  # noqa: E731
        rho2_of = lambda s: 1 - (1 - s.summary["spectral_gap"]) ** 2  # noqa: E731

        def spectral_of(s):
            regime, g = s.group.split("/")
            key = (g, s.seed, regime)
            if key not in lam_spec:
                t = make_topology(g, s.table["data"]["num_clients"], seed=s.seed, er_p=s.table["topology"].get("er_p") or None)
                lam_spec[key] = theory.dsgd_consensus_spectral(lr, 1.0, t.W, noise=regime == "noise")
            return lam_spec[key]

        xh, yh, _ = pts("heterogeneity", gap_of)
        xn, yn, _ = pts("noise", gap_of)
        fit_h = fit_loglog(xh, yh, -2.0)
        fit_n = fit_loglog(xn, yn, -1.0)
        fit_hc = fit_loglog(pts("heterogeneity", rho2_of)[0], yh, -1.0)
        fit_nc = fit_loglog(pts("noise", rho2_of)[0], yn, -1.0)
        fit_hs = fit_loglog(pts("heterogeneity", spectral_of)[0], yh, 1.0)
        fit_ns = fit_loglog(pts("noise", spectral_of)[0], yn, 1.0)
        for f, regime in ((fit_h, "full batch, heterogeneity-driven"), (fit_n, noise_regime)):
            self.claims.append(Claim("B3", "DSGD consensus distance decreases with the spectral gap", "slope < 0 in 1−λ",
                                     f"slope {_fit_text(f)}", "holds" if f["hi"] < 0 else "does not hold", regime))
        self._claim_fit("B3_consensus_vs_gap", "B3", "DSGD consensus distance ∝ η²ζ²/(1−λ)² (Koloskova et al. 2020)",
                        "slope −2 in 1−λ", fit_h, "full batch, heterogeneity-driven")
        self._claim_fit("B3_consensus_codebase_h", "B3", "code base's form Ξ ∝ η²/(1−ρ²)", "slope −1 in 1−ρ²", fit_hc,
                        "full batch, heterogeneity-driven")
        self._claim_fit("B3_consensus_codebase_n", "B3", "code base's form Ξ ∝ η²σ²/(1−ρ²)", "slope −1 in 1−ρ²", fit_nc,
                        noise_regime)
        self._claim_fit("B3_consensus_bound_n", "B3", "DSGD consensus distance ∝ η²σ²/(1−λ) (Koloskova et al. 2020, σ² term)",
                        "slope −1 in 1−λ",
                        fit_n, noise_regime)
        self._claim_fit("B3_consensus_spectral_h", "B3", "Ξ ∝ η²ζ²·mean_k λ_k²/(1−λ_k)² (linearized, all eigenvalues)",
                        "slope 1 in the spectral sum", fit_hs, "full batch, heterogeneity-driven")
        self._claim_fit("B3_consensus_spectral_n", "B3", "Ξ ∝ η²σ²·mean_k λ_k²/(1−λ_k²) (linearized, all eigenvalues)",
                        "slope 1 in the spectral sum", fit_ns,
                        noise_regime)
        # Rounds to ε for gradient tracking (no heterogeneity floor): excess over the complete graph.
        hits: dict[str, list[float]] = {}
        for g in topos:
            for s in self._of("B3", f"tracking/{g}"):
                r, y = self._series(s, self._metric())
                eps = self.scale.eps_rel * y[0]
                idx = np.flatnonzero(y <= eps)
                hits.setdefault(g, []).append(float(r[idx[0]]) if len(idx) else math.nan)
        reached = [h for v in hits.values() for h in v if not math.isnan(h)]
        base_rounds = (float(np.mean(hits["complete"])) if not np.isnan(hits.get("complete", [math.nan])).any()
                       else (min(reached) if reached else math.nan))
        xr, yr, censored = [], [], []
        for g in topos:
            if g == "complete" or sg[g] >= 1:
                continue
            for s, h in zip(self._of("B3", f"tracking/{g}"), hits.get(g, [])):
                if math.isnan(h):
                    censored.append(g)
                    continue
                xr.append(s.summary["spectral_gap"])
                yr.append(h - base_rounds)
        fit_r = fit_loglog(xr, yr, -1.0)
        if not self.scale.gt_rounds:
            self.claims.append(Claim("B3", "rounds to reach ε grow as 1/(1−λ)", "slope −1 in 1−λ", "not measured",
                                     "not testable (no f★)", "without f★ there is no gap to reach ε in, and ‖∇f‖² at the start is "
                                     "no scale for ε (LoRA starts at B = 0, where the gradient is small)"))
        if hits:
            self._claim_fit("B3_rounds_to_eps", "B3", f"rounds to reach ε = {self.scale.eps_rel:g}·gap₀ grow as 1/(1−λ)",
                        "excess rounds over the complete graph ∝ 1/(1−λ) → slope −1", fit_r,
                        "gradient tracking, full batch" + (f"; not reached in {self.scale.gt_rounds} rounds: {', '.join(sorted(set(censored)))}"
                                                           if censored else ""))

        def draw_curves(fig, axes):
            gh = {g: self._of("B3", f"heterogeneity/{g}") for g in topos}
            self._band(axes[0], gh, "global_loss", False)
            axes[0].set_ylabel("global loss f(θ̄)")
            axes[0].legend(fontsize=7)
            axes[0].set_title(f"DSGD, {note_h}", fontsize=8)
            self._band(axes[1], gh, "consensus_distance", True)
            axes[1].set_ylabel("consensus distance Ξ")
            axes[1].set_title(f"DSGD, {note_h}", fontsize=8)
            gn = {g: self._of("B3", f"noise/{g}") for g in topos}
            self._band(axes[2], gn, "consensus_distance", True)
            axes[2].set_ylabel("consensus distance Ξ")
            axes[2].set_title(f"DSGD, {note_n}, {z0}", fontsize=8)

        full_text = "full batch" if self.scale.full == "full" else f"B={self.scale.full} in place of full batch"

        def draw_fit(fig, axes):
            self._scatter_fit(axes[0], xh, yh, fit_h, f"heterogeneity-driven ({full_text})", "spectral gap 1 − λ", "final Ξ")
            self._scatter_fit(axes[0], xn, yn, fit_n, f"noise-driven (B={self.scale.batch}, {z0})", "spectral gap 1 − λ", "final Ξ")
            for g in topos:
                if sg[g] < 1:
                    axes[0].annotate(g, (sg[g], np.mean(yh[xh == sg[g]]) if (xh == sg[g]).any() else 1), fontsize=6)
            axes[0].set_title("final consensus distance vs spectral gap", fontsize=8)
            if len(axes) < 2:
                return
            if len(xr) and hits:
                self._scatter_fit(axes[1], np.array(xr), np.array(yr), fit_r, "gradient tracking", "spectral gap 1 − λ",
                                  "rounds to ε − rounds(complete)")
            axes[1].set_title(f"rounds to ε = {self.scale.eps_rel:g}·gap₀ (GT, {full_text})", fontsize=8)

        def draw_graphs(fig, axes):
            import networkx as nx

            for ax, g in zip(axes, topos):
                s = self._of("B3", f"heterogeneity/{g}")[0]
                t = make_topology(g, s.table["data"]["num_clients"], seed=s.seed, er_p=s.table["topology"].get("er_p") or None)
                pos = (nx.circular_layout(t.graph) if g in ("ring", "path", "complete", "exponential", "erdos_renyi")
                       else nx.kamada_kawai_layout(t.graph))
                nx.draw_networkx(t.graph, pos=pos, ax=ax, node_size=40, with_labels=False, width=0.6, node_color="#4c72b0")
                ax.set_title(f"{g}\n1−λ = {sg[g]:.3g}", fontsize=8)
                ax.set_axis_off()

        f1 = self._figure("b3_topology_curves", f"B3. DSGD (E = 1) on each topology: loss and consensus distance vs rounds; "
                          f"left two: {note_h}; right: {note_n}, {z0}; {self._seeds_note()}.", draw_curves, ncols=3, width=4.4)
        f2 = self._figure("b3_spectral_gap", "B3. Final consensus distance (tail mean) vs spectral gap, both regimes"
                          + (", and gradient tracking's rounds to ε vs spectral gap" if self.scale.gt_rounds else "")
                          + "; complete graph (1−λ = 1, Ξ = 0) is left out of the log-log fits.",
                          draw_fit, ncols=2 if self.scale.gt_rounds else 1)
        f3 = self._figure("b3_graphs", "B3. The graphs (Metropolis–Hastings weights) with their spectral gaps.", draw_graphs,
                          ncols=len(topos), width=2.0, height=2.3)
        rows = []
        for g in topos:
            ch = np.mean([self._tail(s, "consensus_distance") for s in self._of("B3", f"heterogeneity/{g}")])
            cn = np.mean([self._tail(s, "consensus_distance") for s in self._of("B3", f"noise/{g}")])
            reached = [h for h in hits.get(g, []) if not math.isnan(h)]
            rows.append([g, _fmt(sg[g], 4), _fmt(float(ch)), _fmt(float(cn)),
                         _fmt(float(np.mean(reached))) if reached else (f"> {self.scale.gt_rounds}" if g in hits else "–")])
        self.sections.append(Section("B3. Topology and spectral gap", [
            "Two regimes: full batch with heterogeneous users (the consensus distance is driven by ζ²) and minibatches with "
            + ("identical users (ζ = 0, " if z0 == "ζ = 0" else f"an IID split of the same data ({z0}, ")
            + "driven by the gradient noise σ²). Three forms are held against the data: the bound "
            "η²ζ²/(1−λ)² of Koloskova et al. (2020), the code base's η²/(1−ρ²) and the linearized stationary value "
            "η²ζ²·mean_k λ_k²/(1−λ_k)² (noise: η²σ²·mean_k λ_k²/(1−λ_k²)) over all eigenvalues of W. The bound of "
            "Koloskova et al. has a σ² term η²σ²/(1−λ) (exponent −1) and a ζ² term η²ζ²/(1−λ)² (exponent −2)."],
            [Table(["graph", "1−λ", "Ξ (ζ-driven)", "Ξ (noise-driven)", "GT rounds to ε"], rows)], [f3, f1, f2]))

    def analyse_B4(self) -> None:
        groups = {g: self._of("B4", g) for g in self._groups("B4") if not g.startswith("full batch")}
        if not groups:
            return
        note = self._config_note(next(iter(groups.values()))[0])
        base = {s.seed: self._tail(s) for s in self._of("B4", "q_max=0")}
        specs = [s for g, ss in groups.items() for s in ss if s.x > 0]
        x = np.array([s.x for s in specs])
        y = np.array([self._tail(s) - base.get(s.seed, math.nan) for s in specs])
        fit = fit_loglog(x, y, 1.0)
        neg = int((y <= 0).sum())
        self._claim_fit("B4_staleness", "B4", "staleness adds a floor linear in q_max", "excess floor ∝ η² q_max σ²/B → slope 1",
                        fit, "minibatch" + (f"; {neg} point(s) with no excess left out" if neg else ""))
        fb = self._of("B4", next((g for g in self._groups("B4") if g.startswith("full batch")), ""))
        if fb:
            v = max(self._tail(s) for s in fb)
            ok = all(self._tail(s) <= self._zero(s) for s in fb)
            self.claims.append(Claim("B4", "with exact gradients staleness leaves no floor (a delay does not move the fixed point)",
                                     f"floor ≤ {ZERO_REL:g}·gap₀", f"max over seeds {_fmt(v)}", "holds" if ok else "does not hold",
                                     f"full batch, E = 1, q_max = {int(fb[0].x)}", exact=True))

        def draw(fig, axes):
            self._band(axes[0], groups, self._metric(), True)
            axes[0].set_ylabel(self._metric_label())
            axes[0].legend(fontsize=7)
            axes[0].set_title(f"B4 · FedAvg with staleness · {note} · {self._seeds_note()}", fontsize=8)
            self._scatter_fit(axes[1], x, y, fit, "floor(q) − floor(0)", "q_max", "excess floor")

        fig = self._figure("b4_staleness", f"B4. Clients start from the global model of q ~ U{{0..q_max}} rounds ago; {note}; "
                           f"floors are tail means of the last half; {self._seeds_note()}.", draw, ncols=2)
        self.sections.append(Section("B4. Staleness q_max", [
            "Staleness interacts with gradient noise: stale starting points add variance to the averaged update, so the "
            "minibatch floor grows with q_max, while a full-batch run converges to θ★ for any bounded delay (if stable)."],
            [], [fig]))

    def analyse_B5(self) -> None:
        groups = self._groups("B5")
        if groups:
            z2 = lambda s: s.summary["heterogeneity"]  # noqa: E731
            note = self._config_note(self._of("B5", groups[0])[0]).replace(f"ζ-scale={self._of('B5', groups[0])[0].table['data']['heterogeneity']}", "ζ-scale swept")
            fits = {}
            for g, key, claim, regime in [
                ("FedAvg", "B5_fedavg_zeta", "FedAvg drift floor grows with ζ²", f"full batch, E = {self.scale.local_steps + 1}"),
                (next(g for g in groups if g.startswith("FedAvg S=")), "B5_partial_zeta", "partial-participation floor ∝ ζ²", "full batch, E = 1"),
                ("DSGD ring", "B5_dsgd_zeta", "DSGD floor ∝ η²ζ²/(1−λ)² grows with ζ²", "full batch, E = 1, ring"),
            ]:
                x, y = self._points("B5", g, xfn=z2)
                fits[g] = fit_loglog(x, y, 1.0)
                self._claim_fit(key, "B5", claim, "floor ∝ ζ² → slope 1 in ζ²(θ★)", fits[g], regime)
            top = max(s.x for s in self._of("B5"))
            for corr, plain in (("SCAFFOLD", "FedAvg"), ("gradient tracking ring", "DSGD ring")):
                rat = []
                for s in self._of("B5", corr):
                    p = next(q for q in self._of("B5", plain) if q.seed == s.seed and q.x == s.x)
                    rat.append(self._tail(s) / max(self._tail(p), 1e-300))
                worst = max(rat)
                self.claims.append(Claim("B5", f"{corr} removes the ζ² floor of {plain}", "floor(corrected) ≪ floor(plain) at every ζ²",
                                         f"max ratio {_fmt(worst)} over {len(rat)} runs", "holds" if worst < 1e-2 else
                                         ("direction only (exponent differs)" if worst < 1 else "does not hold"), "full batch, same E / graph"))
            gt = [self._tail(s) for s in self._of("B5", "gradient tracking ring") if s.x == top]
            ds = [self._tail(s) for s in self._of("B5", "DSGD ring") if s.x == top]
            self.claims.append(Claim("B5", "gradient tracking beats DSGD at high ζ²", "floor(GT) < floor(DSGD)",
                                     f"GT {_fmt(float(np.mean(gt)))} vs DSGD {_fmt(float(np.mean(ds)))} at ζ-scale {top:g}",
                                     "holds" if np.mean(gt) < np.mean(ds) else "does not hold", "full batch, ring"))

            def draw(fig, axes):
                for g in groups:
                    levels = sorted(set(s.x for s in self._of("B5", g)))
                    mx = [np.mean([z2(s) for s in self._of("B5", g) if s.x == lv]) for lv in levels]
                    Y = [[self._tail(s) for s in self._of("B5", g) if s.x == lv] for lv in levels]
                    mean = np.maximum([np.mean(v) for v in Y], 1e-16)
                    (line,) = axes[0].plot(mx, mean, marker="o", label=g, linewidth=1.4)
                    if self.seeds > 1:
                        axes[0].fill_between(mx, np.maximum([min(v) for v in Y], 1e-16), np.maximum([max(v) for v in Y], 1e-16),
                                             color=line.get_color(), alpha=0.2, linewidth=0)
                axes[0].set_xscale("log")
                axes[0].set_yscale("log")
                axes[0].set_xlabel("ζ² at θ★ (measured)")
                axes[0].set_ylabel(f"floor of {self._metric_label()}")
                axes[0].grid(True, alpha=0.3, which="both")
                axes[0].legend(fontsize=7)
                axes[0].set_title(f"B5 · heterogeneity sweep · {note} · {self._seeds_note()}", fontsize=8)
                hi = {g: [s for s in self._of("B5", g) if s.x == top] for g in groups}
                self._band(axes[1], hi, self._metric(), True)
                axes[1].set_ylabel(self._metric_label())
                axes[1].set_title(f"runs at ζ-scale {top:g}", fontsize=8)

            fig = self._figure("b5_heterogeneity", f"B5. Floors vs measured ζ² for FedAvg (E = {self.scale.local_steps + 1}), FedAvg with "
                               "partial participation (E = 1), SCAFFOLD, DSGD and gradient tracking on a ring; full batch; "
                               f"{note}; {self._seeds_note()}.", draw, ncols=2)
            self.sections.append(Section("B5. Heterogeneity and drift correction", [
                "The synthetic users' reward vectors are θ_i = θ★ + s·u_i; sweeping s sweeps ζ², measured at θ★ in each run. "
                "SCAFFOLD's control variates and gradient tracking's trackers cancel the clients' gradient disagreement, so "
                "their full-batch runs converge to θ★ at every ζ²."], [], [fig]))
        groups_n = self._groups("B5n")
        if groups_n:
            note = self._config_note(self._of("B5n", groups_n[0])[-1]).replace(f"n={self._of('B5n', groups_n[0])[-1].table['data']['num_clients']}", "n swept")
            fit_full = fit_loglog(*self._points("B5n", groups_n[0]), -1.0)
            self._claim_fit("B5_clients_full", "B5", "linear speedup: full-participation noise floor ∝ 1/n",
                            "floor ∝ η σ²/(nB) → slope −1 in n", fit_full, "minibatch, E = 1")
            fit_s = fit_loglog(*self._points("B5n", groups_n[1]), 0.0)
            self.fits["B5_clients_fixed_S"] = fit_s
            ok = math.isfinite(fit_s["hi"]) and fit_s["hi"] >= 0
            self.claims.append(Claim("B5", f"with S = {self.scale.clients_sweep_per_round} clients per round, more clients bring no "
                                     "speedup: the floor does not fall with n", "floor ∝ σ²/(SB) + ζ²(1/S − 1/n): flat or rising in n "
                                     "(slope ≥ 0, not −1)", f"slope {_fit_text(fit_s)}",
                                     "holds" if ok else "does not hold", "minibatch, E = 1"))
            rows = []
            for g in groups_n:
                for lv in sorted(set(s.x for s in self._of("B5n", g))):
                    ss = [s for s in self._of("B5n", g) if s.x == lv]
                    per_round = np.mean([s.result_rows[-1]["wall_time_s"] / s.table["algorithm"]["rounds"] for s in ss])
                    rows.append([g, str(int(lv)), _fmt(float(np.mean([self._tail(s) for s in ss]))), f"{1000 * per_round:.2f}"])

            def draw(fig, axes):
                for g in groups_n:
                    x, y = self._points("B5n", g)
                    f = fit_full if g == groups_n[0] else fit_s
                    self._scatter_fit(axes[0], x, y, f, g, "number of clients n", f"floor of {self._metric_label()}")
                    levels = sorted(set(x))
                    t = [np.mean([s.result_rows[-1]["wall_time_s"] / s.table["algorithm"]["rounds"] for s in self._of("B5n", g) if s.x == lv]) for lv in levels]
                    axes[1].plot(levels, 1000 * np.array(t), marker="o", label=g)
                axes[0].set_title(f"B5 · clients sweep · {note} · {self._seeds_note()}", fontsize=8)
                axes[1].set_xscale("log")
                axes[1].set_yscale("log")
                axes[1].set_xlabel("number of clients n")
                axes[1].set_ylabel("simulator ms per round")
                axes[1].grid(True, alpha=0.3, which="both")
                axes[1].legend(fontsize=7)

            fig = self._figure("b5_num_clients", f"B5. FedAvg with up to {max(self.scale.num_clients_sweep)} clients: floor vs n with full "
                               f"participation and with S fixed, and simulator time per round; {note}; {self._seeds_note()}.", draw, ncols=2)
            self.sections.append(Section("B5. Number of clients", [
                "Each client holds the same number of pairs; with every client participating, a round averages n·B "
                "stochastic gradients, so the noise floor falls as 1/n; with S fixed it does not."],
                [Table(["method", "n", "floor (tail mean)", "ms / round"], rows)], [fig]))

    def analyse(self) -> None:
        for exp in ("theory", "A", "B1", "B2", "B3", "B4", "B5"):
            try:
                getattr(self, f"analyse_{exp}")()
            except Exception as e:  # one failed analysis must not lose the runs; the report lists it and the exit code says so
                self.failed_analyses[exp] = f"{type(e).__name__}: {e}"
                self.sections.append(Section(f"{exp}: analysis failed", [self.failed_analyses[exp]]))
        if self.scale.full != "full":  # LMs: the "exact gradient" runs use a minibatch; say so in every regime
            for c in self.claims:
                c.regime = c.regime.replace("full batch", f"minibatch B={self.scale.full} in place of full batch")
                if c.exact:  # a minibatch floor is never zero: the data cannot speak to this claim
                    c.verdict = "not testable (no exact gradients)"

    # ---- output

    def claim_table(self) -> Table:
        return Table(["exp.", "claim", "predicted dependence", "measured (fitted slope [95% CI])", "verdict", "regime"],
                     [c.row() for c in self.claims],
                     "Fits: least squares of log(measured) on log(variable) over every seed's point; CI = stderr × t(0.975, n−2). "
                     "'holds' = the predicted exponent lies in the CI; 'direction only' = right sign, significant, other exponent; "
                     "'does not hold' = wrong sign or a contradicting measurement.")

    def write(self, out_dir: str | Path, wall_time_s: float, command: str) -> Path:
        out = Path(out_dir)
        rows = [r for s in self.specs for r in s.result_rows]
        extra = ["experiment", "group", "x", "seed"]
        columns = COLUMNS + extra + sorted({k for r in rows for k in r} - set(COLUMNS) - set(extra))
        write_csv_atomic(out / "metrics.csv", rows, columns)
        load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
        machine = {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
                   "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "loadavg_at_end": list(load)}
        summary = {
            "dataset": self.dataset, "description": self.ds.description, "seeds": self.seeds, "quick": self.quick,
            "command": command, "wall_time_s": wall_time_s, "machine": machine, "metric": self._metric(),
            "theory": self.theory, "fits": self.fits, "claims": [vars(c) for c in self.claims], "failed_runs": dict(self.failed),
            "failed_analyses": dict(self.failed_analyses),
            "runs": {s.label: {**s.summary, "experiment": s.experiment, "group": s.group, "x": s.x, "seed": s.seed,
                               "config": s.table} for s in self.specs if s.result_rows},
        }
        reused = [sp for sp in self.specs if sp.reused]
        run_seconds = float(sum(sp.seconds for sp in self.specs if sp.result_rows))
        summary.update(run_seconds_total=run_seconds, reused_runs=len(reused))
        wall_text = f"{wall_time_s:.1f} s" + (
            f" in this call, which reused {len(reused)} runs finished by an earlier one (--resume); every run's training "
            f"and evaluation together took {run_seconds:.1f} s" if reused else "")
        write_json_atomic(out / "summary.json", summary)
        holds = sum(c.verdict.startswith("holds") for c in self.claims)
        untestable = sum(c.verdict.startswith("not testable") for c in self.claims)
        counted = f"{holds} of {len(self.claims) - untestable} testable claims hold as stated" + (
            f" ({untestable} cannot be tested on this dataset; their rows say why)" if untestable else "")
        report = Report(
            f"distdpo reproduce — {self.dataset}",
            [("command", command), ("data", self.ds.description), ("seeds", str(self.seeds)),
             ("mode", "quick" if self.quick else "full"), ("runs", str(len(self.specs))),
             ("wall time", wall_text), ("machine", f"{machine['platform']}, {machine['cpu_count']} CPUs, "
                                                                  f"torch {machine['torch']} ({machine['torch_threads']} threads), "
                                                                  f"load average at end {load[0]:.2f}"),
             ("raw data", "metrics.csv (every evaluated round of every run), summary.json (summaries, configs, fits, claims)")],
            [Section("Claims held against the data", [
                f"{counted}. Curves are means over seeds with a min–max band; "
                "a floor is the mean of the last half of the evaluated rounds for stochastic runs (minibatches or client "
                "sampling) and of the last tenth for deterministic ones. Where a claim does not hold, the row says so with the numbers."
                + self._transient_note()], [self.claim_table()])] + self.sections
            + ([Section("Failed runs", [f"{label}: {err}" for label, err in self.failed])] if self.failed else []),
        )
        write_report(report, out)
        return out


def reproduce(dataset: str = "synthetic", *, seeds: int | None = None, quick: bool = False, out: str | Path | None = None,
              progress: bool = True, command: str = "", resume: bool = False) -> Path:
    """Run the suite on ``dataset`` and write the report, metrics.csv and summary.json into ``out``.

    ``seeds`` defaults to the dataset's (3 for synthetic, 2 for the language-model datasets); ``resume`` reuses the
    runs an interrupted call finished in ``out``.
    """
    ds = DATASETS.get(dataset)
    if seeds is None:
        seeds = ds.default_seeds if ds else 3  # an unknown dataset is refused by Suite, naming the known ones
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}")
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    if ds and ds.synthetic_model:
        # The runs are small: one thread is as fast, and intra-op threads stall badly when the cores are shared.
        torch.set_num_threads(1)
    try:
        out = Path(out) if out else Path("runs") / f"reproduce-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
        done = finished_runs(out, resume)  # before Suite: an LM suite builds its first task (seconds) on creation
        suite = Suite(dataset, seeds=seeds, quick=quick, progress=progress)
        suite.run(out, done)
        suite.analyse()
        return suite.write(out, time.perf_counter() - t0,
                           command or f"distdpo reproduce --dataset {dataset} --seeds {seeds}{' --quick' if quick else ''}")
    finally:
        torch.set_num_threads(threads)


def format_claims(summary: dict) -> str:
    """The claim table of a ``summary.json`` as aligned plain text."""
    lines = []
    for c in summary["claims"]:
        lines.append(f"[{c['experiment']:<3}] {c['verdict']:<34} {c['claim']}\n      predicted: {c['predicted']}; measured: {c['measured']} ({c['regime']})")
    return "\n".join(lines)
