"""Runs of the suite: the key that names a run, the run itself, and the plan that builds every run's config."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

from distdpo.config import ConfigError, from_dict
from distdpo.reproduce.datasets import Dataset, Scale, without_progress


@dataclass(frozen=True)
class RunKey:
    """What a run is: one seed of one series of one experiment, at one level ``x`` of the swept variable.

    ``regime`` and ``graph`` name B3's runs, which are grouped by the regime they measure and the graph they run on
    (``"heterogeneity/ring"``); every other run is grouped by its series.
    """

    experiment: str
    series: str
    regime: str | None = None
    graph: str | None = None
    x: float = math.nan  # the swept level (NaN when none)
    seed: int = 0

    @property
    def group(self) -> str:
        """The curve the run belongs to, as figures, metrics.csv and summary.json name it."""
        if self.regime is not None and self.graph is not None:
            return f"{self.regime}/{self.graph}"
        return self.series

    @property
    def label(self) -> str:
        """The run's name in metrics.csv (``run``), summary.json and its record in DIR/runs/."""
        level = "" if math.isnan(self.x) else f"/x={self.x:g}"
        return f"{self.experiment}/{self.group}{level}/seed={self.seed}"


@dataclass
class Run:
    key: RunKey
    table: dict
    rows: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    seconds: float = math.nan  # training + evaluation time of this run
    reused: bool = False  # finished by an earlier, interrupted call (--resume)

    @property
    def finished(self) -> bool:
        return bool(self.rows)

    @property
    def label(self) -> str:
        return self.key.label

    @property
    def x(self) -> float:
        return self.key.x

    @property
    def seed(self) -> int:
        return self.key.seed


def merged(base: dict, **sections: dict) -> dict:
    """A copy of ``base`` with each named section updated by the given values."""
    table = copy.deepcopy(base)
    for name, values in sections.items():
        table.setdefault(name, {}).update(values)
    return table


def with_connected_graph(table: dict) -> dict:
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


class Plan:
    """What every experiment builds its runs from: the dataset, its scale and base config, and the seeds."""

    def __init__(self, dataset: Dataset, quick: bool, seeds: int):
        self.dataset, self.quick, self.seeds = dataset, quick, seeds
        self.scale: Scale = dataset.scale(quick)
        self.base = without_progress(dataset.base(quick))
        self.num_clients: int = self.base["data"].get("num_clients", 16)

    def algorithm(self, **values) -> dict:
        """An algorithm section running the suite's number of rounds (unless ``values`` says otherwise)."""
        return {"rounds": self.scale.rounds, **values}

    def engine(self, eval_every: int | None = None) -> dict:
        return {"eval_every": self.scale.eval_every if eval_every is None else eval_every, "progress": False}

    def config(self, **sections: dict) -> dict:
        """The base config with the given sections updated."""
        return merged(self.base, **sections)

    def seeded(
        self,
        experiment: str,
        series: str,
        table: dict,
        *,
        x: float = math.nan,
        regime: str | None = None,
        graph: str | None = None,
    ) -> list[Run]:
        """One run of ``table`` for every seed."""
        runs = []
        for seed in range(self.seeds):
            seeded_table = merged(table)
            seeded_table["seed"] = seed
            key = RunKey(experiment, series, regime, graph, float(x), seed)
            runs.append(Run(key, with_connected_graph(seeded_table)))
        return runs
