"""B4. Staleness q_max: the minibatch floor of FedAvg vs q_max, and a full-batch run showing that exact gradients
leave no staleness floor."""

from __future__ import annotations

import math

import numpy as np

from distdpo.report import Section
from distdpo.reproduce.findings import Findings
from distdpo.reproduce.plotting import band_panel, render_figure, scatter_fit
from distdpo.reproduce.results import ZERO_REL, Results
from distdpo.reproduce.runs import Plan, Run
from distdpo.reproduce.stats import fit_loglog, format_number

NAME = "B4"


ABOUT = (
    "Staleness interacts with gradient noise: stale starting points add variance to the averaged update, so the "
    "minibatch floor grows with q_max, while a full-batch run converges to θ★ for any bounded delay (if stable)."
)


def staleness_series(q_max: int) -> str:
    return f"q_max={q_max}"


def full_batch_series(q_max: int) -> str:
    return f"full batch q_max={q_max}"


def runs(plan: Plan) -> list[Run]:
    scale = plan.scale
    out = []
    for q_max in scale.staleness:
        algorithm = plan.algorithm(
            name="fedavg", local_steps=max(2, scale.local_steps - 2), batch_size=scale.batch, staleness=q_max
        )
        out += plan.seeded(
            NAME, staleness_series(q_max), plan.config(algorithm=algorithm, engine=plan.engine()), x=q_max
        )
    q_max = max(scale.staleness)
    algorithm = plan.algorithm(name="fedavg", local_steps=1, batch_size=scale.full, staleness=q_max)
    out += plan.seeded(NAME, full_batch_series(q_max), plan.config(algorithm=algorithm, engine=plan.engine()), x=q_max)
    return out


def analyse(results: Results) -> Findings:
    findings = Findings(NAME)
    staleness = results.scale.staleness
    groups = {staleness_series(q): results.select(NAME, staleness_series(q), x=q) for q in staleness}
    note = results.config_note(next(iter(groups.values()))[0])
    without_delay = {run.seed: results.floor(run) for run in results.select(NAME, staleness_series(0), x=0)}
    delayed = [run for runs in groups.values() for run in runs if run.x > 0]
    x = np.array([run.x for run in delayed])
    excess = np.array([results.floor(run) - without_delay.get(run.seed, math.nan) for run in delayed])
    fit = fit_loglog(x, excess, 1.0)
    no_excess = int((excess <= 0).sum())
    findings.fitted(
        "B4_staleness",
        "staleness adds a floor linear in q_max",
        "excess floor ∝ η² q_max σ²/B → slope 1",
        fit,
        "minibatch" + (f"; {no_excess} point(s) with no excess left out" if no_excess else ""),
    )
    q_max = max(staleness)
    exact = results.select(NAME, full_batch_series(q_max), x=q_max)
    findings.claimed(
        "with exact gradients staleness leaves no floor (a delay does not move the fixed point)",
        f"floor ≤ {ZERO_REL:g}·gap₀",
        f"max over seeds {format_number(max(results.floor(run) for run in exact))}",
        all(results.floor(run) <= results.optimum_level(run) for run in exact),
        f"full batch, E = 1, q_max = {q_max}",
        exact=True,
    )

    def draw(fig, axes):
        band_panel(
            axes[0],
            results.curves_over_seeds(groups, results.metric),
            log=True,
            ylabel=results.metric_label,
            legend=True,
            title=f"B4 · FedAvg with staleness · {note} · {results.seeds_note()}",
        )
        scatter_fit(axes[1], x, excess, fit, "floor(q) − floor(0)", "q_max", "excess floor")

    figure = render_figure(
        "b4_staleness",
        f"B4. Clients start from the global model of q ~ U{{0..q_max}} rounds ago; {note}; floors are tail means of "
        f"the last half; {results.seeds_note()}.",
        draw,
        ncols=2,
    )
    findings.sections.append(
        Section(
            "B4. Staleness q_max",
            [ABOUT],
            [],
            [figure],
        )
    )
    return findings
