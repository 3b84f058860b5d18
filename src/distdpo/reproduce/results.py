"""The finished runs of a suite as the analyses see them: selection by key, curves, floors and figure notes."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from distdpo.experiment import Cache
from distdpo.reproduce.datasets import Dataset, Scale
from distdpo.reproduce.findings import Findings
from distdpo.reproduce.plotting import band_panel
from distdpo.reproduce.runs import Run
from distdpo.reproduce.stats import format_number

# A floor at or below ZERO_REL × (gap at round 0) is "at the optimum" (float32 runs bottom out near 1e-14).
ZERO_REL = 1e-7


class MissingRuns(LookupError):
    """An analysis asked for runs that the suite did not finish (or never planned)."""


class Results:
    """Every run of the suite (finished or not) in plan order, with the dataset, scale and task cache."""

    def __init__(self, dataset: Dataset, scale: Scale, base: dict, seeds: int, runs: list[Run], cache: Cache):
        self.dataset, self.scale, self.base, self.seeds, self.cache = dataset, scale, base, seeds, cache
        self.runs = runs
        self.num_clients: int = base["data"].get("num_clients", 16)

    # ---- selection

    def select(
        self,
        experiment: str,
        series: str | None = None,
        *,
        regime: str | None = None,
        graph: str | None = None,
        x: float | None = None,
        seed: int | None = None,
    ) -> list[Run]:
        """The finished runs whose key matches every given field, in plan order; none raises :class:`MissingRuns`."""
        wanted = {"series": series, "regime": regime, "graph": graph, "x": x, "seed": seed}
        wanted = {name: value for name, value in wanted.items() if value is not None}
        found = [
            run
            for run in self.runs
            if run.finished
            and run.key.experiment == experiment
            and all(getattr(run.key, name) == value for name, value in wanted.items())
        ]
        if not found:
            query = ", ".join(f"{name}={value!r}" for name, value in wanted.items())
            known = sorted({run.key.group for run in self.runs if run.key.experiment == experiment and run.finished})
            raise MissingRuns(
                f"no finished runs of experiment {experiment}"
                + (f" with {query}" if query else "")
                + (f"; its finished series are {', '.join(map(repr, known))}" if known else "; it has none")
            )
        return found

    def sweep(self, experiment: str, series: Callable[[float], str], values) -> dict[str, list[Run]]:
        """One group of runs per swept value ``x``, named ``series(x)``."""
        return {series(x): self.select(experiment, series(x), x=x) for x in values}

    # ---- what is measured

    @property
    def metric(self) -> str:
        """The suboptimality measure: f(θ̄) − f★ where f★ is known, else ‖∇f(θ̄)‖²."""
        summary = next((run.summary for run in self.runs if run.summary), {})
        return "optimality_gap" if summary.get("f_star") is not None else "grad_norm_sq"

    @property
    def metric_label(self) -> str:
        return "f(θ̄) − f★" if self.metric == "optimality_gap" else "‖∇f(θ̄)‖²"

    @staticmethod
    def curve(run: Run, column: str, upto: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(rounds, values) of one column of a run, up to round ``upto``."""
        rows = [r for r in run.rows if upto is None or r["round"] <= upto]
        return np.array([r["round"] for r in rows], float), np.array([r[column] for r in rows], float)

    def curves_over_seeds(
        self, groups: dict[str, list[Run]], column: str, upto: int | None = None
    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """For each group: its rounds and one row of ``column`` per run, cut to the shortest run."""
        out = {}
        for name, runs in groups.items():
            curves = [self.curve(run, column, upto) for run in runs]
            if not curves or not len(curves[0][0]):
                continue
            length = min(len(values) for _, values in curves)
            out[name] = curves[0][0][:length], np.stack([values[:length] for _, values in curves])
        return out

    @staticmethod
    def is_stochastic(run: Run) -> bool:
        """Minibatches or client sampling: the run's curve is noisy."""
        algorithm = run.table.get("algorithm", {})
        n = run.table.get("data", {}).get("num_clients", 16)
        return algorithm.get("batch_size", 32) != "full" or 0 < algorithm.get("clients_per_round", 0) < n

    def optimum_level(self, run: Run) -> float:
        """The level below which a run counts as at the optimum: ZERO_REL × its gap at round 0."""
        return ZERO_REL * self.curve(run, self.metric)[1][0]

    def floor(self, run: Run, column: str | None = None, upto: int | None = None) -> float:
        """A run's floor: the mean of the last half of its evaluated rounds when it is stochastic (averaging the
        noise), of the last tenth when it is deterministic (full batch, every client)."""
        fraction = 0.5 if self.is_stochastic(run) else 0.1
        _, values = self.curve(run, column or self.metric, upto)
        values = values[1:] if len(values) > 1 else values
        count = max(1, round(len(values) * fraction))
        return float(np.mean(values[-count:]))

    def claim_no_floor(
        self, findings: Findings, claim: str, runs: list[Run], regime: str, floor: str = "floor", when: str = ""
    ) -> None:
        """The claim that exact gradients leave no floor: every run's floor is at its optimum level."""
        floors = [(self.floor(run), self.optimum_level(run)) for run in runs]
        findings.claimed(
            claim,
            f"{floor} ≤ {ZERO_REL:g}·gap₀",
            f"max over seeds {format_number(max(v for v, _ in floors))}{when}",
            all(v <= level for v, level in floors),
            regime,
            exact=True,
        )

    def panel(
        self, ax, groups: dict[str, list[Run]], title: str, column: str | None = None, ylabel: str | None = None
    ) -> None:
        """One band panel of ``column`` (default: the suboptimality measure) over rounds, log scale, with a legend."""
        curves = self.curves_over_seeds(groups, column or self.metric)
        band_panel(ax, curves, log=True, ylabel=ylabel or self.metric_label, legend=True, title=title)

    # ---- how figures and tables name a configuration

    def config_note(self, run: Run) -> str:
        algorithm, data = run.table.get("algorithm", {}), run.table.get("data", {})
        batch = algorithm.get("batch_size", 32)
        parts = [f"{self.dataset.name}", f"n={data.get('num_clients')}"]
        if self.dataset.synthetic_model:
            parts += [f"d={data.get('dim')}", f"ζ-scale={data.get('heterogeneity')}"]
        policy = run.table.get("policy", {})
        if policy.get("kind") == "loglinear" and data.get("source", "synthetic") != "synthetic":
            parts.append(f"d={policy.get('feature_dim')} {policy.get('features')} text features")
        parts += [f"η={algorithm.get('lr')}", "full batch" if batch == "full" else f"minibatch B={batch}"]
        return ", ".join(parts)

    def seeds_note(self) -> str:
        plural = "s" if self.seeds > 1 else ""
        return f"mean of {self.seeds} seed{plural}" + (", band = min–max over seeds" if self.seeds > 1 else "")

    @property
    def full_batch_text(self) -> str:
        """What the suite's "full batch" runs use."""
        return "full batch" if self.scale.exact_gradients else f"B={self.scale.full} in place of full batch"
