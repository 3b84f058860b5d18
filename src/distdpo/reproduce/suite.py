"""The suite: plan every experiment's runs, train them (resuming what an earlier call finished), analyse, write."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from distdpo.config import ConfigError, from_dict
from distdpo.experiment import Cache, run_one
from distdpo.report import Section
from distdpo.reproduce import store
from distdpo.reproduce.datasets import DATASETS, DatasetUnavailable, dataset_base
from distdpo.reproduce.experiments import EXPERIMENTS, theory_instance
from distdpo.reproduce.findings import Claim, Findings
from distdpo.reproduce.output import write_outputs
from distdpo.reproduce.results import Results
from distdpo.reproduce.runs import Plan, Run
from distdpo.reproduce.stats import Verdict


class Suite:
    """Runs every experiment's runs and turns them into figures, fits and claims."""

    def __init__(self, dataset: str = "synthetic", *, seeds: int = 3, quick: bool = False, progress: bool = True):
        dataset_base(dataset, quick)  # validates; raises DatasetUnavailable with what is missing
        self.dataset = DATASETS[dataset]
        self.seeds, self.quick, self.progress = seeds, quick, progress
        self.experiments = [e for e in EXPERIMENTS if e is theory_instance or e.NAME in self.dataset.experiments]
        plan = Plan(self.dataset, quick, seeds)
        self.scale, self.base = plan.scale, plan.base
        self.runs: list[Run] = [run for experiment in self.experiments for run in experiment.runs(plan)]
        self.cache = Cache()
        if self.dataset.needs:  # build the first task now: a workload that is not installed fails here, saying so
            try:
                self.cache.task(from_dict(self.runs[0].table))
            except (ImportError, NotImplementedError, ConfigError) as e:
                raise DatasetUnavailable(
                    f"dataset {dataset!r} needs {self.dataset.needs}; building its task failed: "
                    f"{type(e).__name__}: {e}. Use --dataset synthetic meanwhile"
                ) from None
        self.results = Results(self.dataset, self.scale, self.base, seeds, self.runs, self.cache)
        self.claims: list[Claim] = []
        self.fits: dict[str, dict] = {}
        self.sections: list[Section] = []
        self.theory: dict[str, Any] = {}
        self.claims_note = ""
        self.failed: list[tuple[str, str]] = []
        self.failed_analyses: dict[str, str] = {}

    def run(self, out: Path | None = None, done: dict[str, dict] | None = None) -> None:
        """Train every run not in ``done`` (see :func:`~distdpo.reproduce.store.finished_runs`); with ``out``, each
        finished run is kept in out/runs/ as it completes."""
        from tqdm.auto import tqdm

        done = done or {}
        bar = tqdm(
            self.runs, desc=f"reproduce {self.dataset.name}", unit="run", disable=None if self.progress else True
        )
        for index, run in enumerate(bar):
            bar.set_postfix_str(run.label[:40])
            if store.restore(run, done, self.cache):
                continue
            started = time.perf_counter()
            try:
                rows, summary = run_one(from_dict(run.table), run.label, self.cache, progress=False)
            except (FloatingPointError, RuntimeError, ValueError) as e:  # one failed run must not lose the others
                self.failed.append((run.label, f"{type(e).__name__}: {e}"))
                continue
            if summary.get("status") != "ok":  # diverged: its curve would end early; listed, not analysed
                self.failed.append((run.label, f"{summary['status']}: {summary.get('reason', '')}"))
                continue
            key = run.key
            for row in rows:
                row.update(experiment=key.experiment, group=key.group, x=key.x, seed=key.seed)
            run.rows, run.summary, run.seconds = rows, summary, time.perf_counter() - started
            if out is not None:
                store.save(out, index, run)
        bar.close()

    def analyse(self) -> None:
        """Every experiment's analysis; one that fails is listed (and the report says so) without losing the others."""
        for experiment in self.experiments:
            try:
                findings: Findings = experiment.analyse(self.results)
            except Exception as e:  # noqa: BLE001 -- any failure is listed in the report and the exit code says so
                self.failed_analyses[experiment.NAME] = f"{type(e).__name__}: {e}"
                self.sections.append(
                    Section(f"{experiment.NAME}: analysis failed", [self.failed_analyses[experiment.NAME]])
                )
                continue
            self.claims += findings.claims
            self.fits.update(findings.fits)
            self.sections += findings.sections
            self.claims_note += findings.claims_note
            self.theory.update(findings.theory)
        if not self.scale.exact_gradients:  # LMs: the "exact gradient" runs use a minibatch; say so in every regime
            for claim in self.claims:
                claim.regime = claim.regime.replace(
                    "full batch", f"minibatch B={self.scale.full} in place of full batch"
                )
                if claim.exact:  # a minibatch floor is never zero: the data cannot speak to this claim
                    claim.verdict = Verdict.NOT_TESTABLE_NO_EXACT_GRADIENTS

    def write(self, out_dir: str | Path, wall_time_s: float, command: str) -> Path:
        return write_outputs(self, Path(out_dir), wall_time_s, command)


def reproduce(
    dataset: str = "synthetic",
    *,
    seeds: int | None = None,
    quick: bool = False,
    out: str | Path | None = None,
    progress: bool = True,
    command: str = "",
    resume: bool = False,
) -> Path:
    """Run the suite on ``dataset`` and write the report, metrics.csv and summary.json into ``out``.

    ``seeds`` defaults to the dataset's (3 for the log-linear datasets, 2 for the language-model datasets);
    ``resume`` reuses the runs an interrupted call finished in ``out``.
    """
    known = DATASETS.get(dataset)
    if seeds is None:
        seeds = known.default_seeds if known else 3  # an unknown dataset is refused by Suite, naming the known ones
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}")
    started = time.perf_counter()
    threads = torch.get_num_threads()
    if known and known.log_linear:
        # The runs are small: one thread is as fast, and intra-op threads stall badly when the cores are shared.
        torch.set_num_threads(1)
    try:
        out = Path(out) if out else Path("runs") / f"reproduce-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
        done = store.finished_runs(out, resume)  # before Suite: an LM suite builds its first task (seconds) on creation
        suite = Suite(dataset, seeds=seeds, quick=quick, progress=progress)
        suite.run(out, done)
        suite.analyse()
        command = command or f"distdpo reproduce --dataset {dataset} --seeds {seeds}{' --quick' if quick else ''}"
        return suite.write(out, time.perf_counter() - started, command)
    finally:
        torch.set_num_threads(threads)
