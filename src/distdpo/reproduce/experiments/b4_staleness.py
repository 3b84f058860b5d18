"""B4. Staleness q_max: the minibatch floor of FedAvg vs q_max, and a full-batch run showing that exact gradients
leave no staleness floor."""

from __future__ import annotations

import math

import numpy as np

from distdpo.reproduce.findings import Findings
from distdpo.reproduce.plotting import render_figure, scatter_fit
from distdpo.reproduce.results import Results
from distdpo.reproduce.runs import Plan, Run
from distdpo.reproduce.stats import fit_loglog

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
    groups = results.sweep(NAME, staleness_series, staleness)
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
    results.claim_no_floor(
        findings,
        "with exact gradients staleness leaves no floor (a delay does not move the fixed point)",
        results.select(NAME, full_batch_series(q_max), x=q_max),
        f"full batch, E = 1, q_max = {q_max}",
    )

    def draw(fig, axes):
        results.panel(axes[0], groups, f"B4 · FedAvg with staleness · {note} · {results.seeds_note()}")
        scatter_fit(axes[1], x, excess, fit, "floor(q) − floor(0)", "q_max", "excess floor")

    caption = (
        f"B4. Clients start from the global model of q ~ U{{0..q_max}} rounds ago; {note}; floors are tail means of "
        f"the last half; {results.seeds_note()}."
    )
    figure = render_figure("b4_staleness", caption, draw, ncols=2)
    findings.section("B4. Staleness q_max", ABOUT, [figure])
    return findings
