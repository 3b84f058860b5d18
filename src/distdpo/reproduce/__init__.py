"""``distdpo reproduce``: the paper's experiments and claims as measurements, in one command.

A *dataset* (:mod:`.datasets`) is a base config (its ``data`` and ``policy`` sections plus the step size that suits
it) and the experiments it supports. Each experiment (:mod:`.experiments`) builds its runs on top of it, each named
by a :class:`~.runs.RunKey`; the suite (:mod:`.suite`) trains them over seeds with
:func:`distdpo.experiment.run_one` (one shared :class:`~distdpo.experiment.Cache`, so runs on the same data share the
task and f★), keeps each finished run in DIR/runs/ (:mod:`.store`), hands the finished runs (:mod:`.results`) to each
experiment's analysis, which fits the dependences the theory predicts (:mod:`.stats`: log-log least squares,
CI = stderr × t-quantile) and draws its figures (:mod:`.plotting`), and writes (:mod:`.output`)

* ``report.html`` (self-contained, figures embedded) and ``report.md`` (+ ``figures/*.png``),
* ``metrics.csv`` (every round of every run, with ``experiment``, ``group``, ``x``, ``seed`` columns),
* ``summary.json`` (every run's summary and config, the fits, the claim table, the theory instance).

Experiments: A (centralized vs FedAvg full / partial vs DSGD ring), B1 local steps E, B2 participation S, B3
topologies and spectral gap, B4 staleness q_max, B5 heterogeneity ζ², number of clients, drift correction; P (the
text-feature suites) the personalization gap.
"""

from distdpo.reproduce.datasets import DATASETS, Dataset, DatasetUnavailable, Scale, dataset_base
from distdpo.reproduce.output import format_claims
from distdpo.reproduce.results import MissingRuns
from distdpo.reproduce.runs import Run, RunKey
from distdpo.reproduce.stats import Verdict, fit_loglog, verdict
from distdpo.reproduce.store import finished_runs
from distdpo.reproduce.suite import Suite, reproduce

__all__ = [
    "DATASETS",
    "Dataset",
    "DatasetUnavailable",
    "MissingRuns",
    "Run",
    "RunKey",
    "Scale",
    "Suite",
    "Verdict",
    "dataset_base",
    "finished_runs",
    "fit_loglog",
    "format_claims",
    "reproduce",
    "verdict",
]
