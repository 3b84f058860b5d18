"""B1. Local steps E: the full-batch client-drift floor of FedAvg vs E, and a longer run showing it is a floor."""

from __future__ import annotations

import numpy as np

from distdpo.reproduce.findings import Findings
from distdpo.reproduce.plotting import render_figure, scatter_fit
from distdpo.reproduce.results import Results
from distdpo.reproduce.runs import Plan, Run
from distdpo.reproduce.stats import fit_loglog, format_number

NAME = "B1"


ABOUT = (
    "Full batch isolates the deterministic client-drift floor: with E = 1 FedAvg is gradient descent on f and "
    "converges to θ★; with E > 1 the local models drift toward their own optima and the average stops short of "
    "θ★."
)


def local_steps_series(local_steps: int) -> str:
    return f"E={local_steps}"


def runs(plan: Plan) -> list[Run]:
    scale = plan.scale
    out = []
    for local_steps in scale.local_steps_sweep:
        algorithm = {
            "name": "fedavg",
            "rounds": scale.rounds * scale.long_factor,
            "local_steps": local_steps,
            "batch_size": scale.full,
        }
        table = plan.config(algorithm=algorithm, engine=plan.engine(scale.eval_every * 2))
        out += plan.seeded(NAME, local_steps_series(local_steps), table, x=local_steps)
    return out


def analyse(results: Results) -> Findings:
    findings = Findings(NAME)
    scale = results.scale
    groups = results.sweep(NAME, local_steps_series, scale.local_steps_sweep)
    rounds, long_rounds = scale.rounds, scale.rounds * scale.long_factor
    note = results.config_note(next(iter(groups.values()))[0])
    every = results.select(NAME)
    x = np.array([run.x - 1 for run in every], float)
    floors_at_rounds = np.array([results.floor(run, upto=rounds) for run in every], float)
    floors_at_end = np.array([results.floor(run) for run in every])
    fit = fit_loglog(x, floors_at_rounds, 2.0)
    findings.fitted(
        "B1_drift",
        "federated floor grows with local steps E (client drift)",
        "floor ∝ η²(E−1)²ζ² → slope 2 in (E−1)",
        fit,
        f"full batch, E ≥ 2, floor at round {rounds}",
    )
    if 1 in scale.local_steps_sweep:
        results.claim_no_floor(
            findings,
            "E = 1 full-batch FedAvg (= gradient descent) has no floor",
            results.select(NAME, x=1),
            "full batch, longer run",
            when=f" at round {long_rounds}",
        )
    ratios = [
        at_end / at_rounds
        for run, at_rounds, at_end in zip(every, floors_at_rounds, floors_at_end)
        if run.x > 1 and at_rounds > results.optimum_level(run)
    ]
    if ratios and long_rounds > rounds:
        findings.claimed(
            f"for E > 1 the gap is a floor, not a transient (round {long_rounds} vs {rounds})",
            "ratio ≈ 1",
            f"ratio min {format_number(min(ratios))}, max {format_number(max(ratios))}",
            all(0.75 <= r <= 1.33 for r in ratios),
            "full batch, longer run",
        )

    def draw(fig, axes):
        results.panel(axes[0], groups, f"B1 · FedAvg · {note} · {results.seeds_note()}")
        axes[0].axvline(rounds, color="k", linestyle=":", linewidth=1)
        scatter_fit(axes[1], x, floors_at_rounds, fit, "floor at round R", "E − 1", results.metric_label)
        no_floor = "; E = 1 has no floor" if scale.exact_gradients else ""
        axes[1].set_title("floor vs E − 1 (log-log)" + no_floor, fontsize=8)

    caption = (
        f"B1. FedAvg with E local steps, full participation, {note}; dotted line = R = {rounds} (fit), the run "
        f"continues to {long_rounds} (the longer run); {results.seeds_note()}."
    )
    figure = render_figure("b1_local_steps", caption, draw, ncols=2)
    findings.section("B1. Local steps E", ABOUT, [figure])
    return findings
