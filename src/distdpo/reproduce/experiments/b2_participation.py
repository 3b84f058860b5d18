"""B2. Participation S: the FedAvg floor vs 1/S and vs 1/S − 1/n (full batch, E = 1: sampling is the only noise)."""

from __future__ import annotations

import itertools

import numpy as np

from distdpo.reproduce.findings import Findings
from distdpo.reproduce.plotting import LOG_FLOOR, render_figure, scatter_fit
from distdpo.reproduce.results import Results
from distdpo.reproduce.runs import Plan, Run
from distdpo.reproduce.stats import fit_loglog, format_number

NAME = "B2"


ABOUT = (
    "Each round averages S sampled clients' gradients: an unbiased but noisy estimate of ∇f whose variance is "
    "ζ²(1/S − 1/n)·n/(n−1). At a constant step size this variance sets the floor."
)


def participation_series(clients_per_round: int) -> str:
    return f"S={clients_per_round}"


def participation_levels(scale, num_clients: int) -> list[int]:
    return [s for s in scale.participation if s <= num_clients]


def runs(plan: Plan) -> list[Run]:
    out = []
    for clients in participation_levels(plan.scale, plan.num_clients):
        algorithm = plan.algorithm(name="fedavg", local_steps=1, batch_size=plan.scale.full, clients_per_round=clients)
        table = plan.config(algorithm=algorithm, engine=plan.engine())
        out += plan.seeded(NAME, participation_series(clients), table, x=clients)
    return out


def analyse(results: Results) -> Findings:
    findings = Findings(NAME)
    n = results.num_clients
    levels = participation_levels(results.scale, n)
    groups = results.sweep(NAME, participation_series, levels)
    note = results.config_note(next(iter(groups.values()))[0]) + ", E=1"
    every = results.select(NAME)
    x = np.array([1 / run.x - 1 / n for run in every])
    floors = np.array([results.floor(run) for run in every])
    fit = fit_loglog(x, floors, 1.0)
    findings.fitted(
        "B2_participation",
        "partial-participation floor ∝ ζ²/S (sampling without replacement)",
        "floor ∝ η ζ² (1/S − 1/n) → slope 1",
        fit,
        "full batch, E = 1, S < n",
    )
    sampled = sorted({run.x for run in every})
    means = [float(np.mean([results.floor(run) for run in every if run.x == s])) for s in sampled]
    findings.claimed(
        "gap decreases with S",
        "monotone in S",
        f"floors by S = {', '.join(f'{s:g}' for s in sampled)}: {', '.join(format_number(m) for m in means)}",
        all(a >= b for a, b in itertools.pairwise(means)),
        "full batch, E = 1",
    )
    if n in levels:
        results.claim_no_floor(
            findings,
            "S = n (every client, exact gradients) has no floor",
            results.select(NAME, x=n),
            "full batch, E = 1",
            floor="floor(S=n)",
        )

    def draw(fig, axes):
        results.panel(axes[0], groups, f"B2 · FedAvg · {note} · {results.seeds_note()}")
        axes[1].scatter([1 / run.x for run in every], np.maximum(floors, LOG_FLOOR), s=18)
        axes[1].set_xlabel("1/S")
        axes[1].set_ylabel("floor (tail mean)")
        axes[1].set_yscale("log")
        axes[1].grid(True, alpha=0.3)
        axes[1].set_title("floor vs 1/S", fontsize=8)
        scatter_fit(axes[2], x, floors, fit, "floor", "1/S − 1/n", results.metric_label)
        axes[2].set_title("floor vs 1/S − 1/n (log-log)", fontsize=8)

    caption = (
        f"B2. FedAvg sampling S of n = {n} clients per round, {note}; floors are tail means of the last half of the "
        f"rounds; {results.seeds_note()}."
    )
    figure = render_figure("b2_participation", caption, draw, ncols=3, width=4.4)
    findings.section("B2. Participation S", ABOUT, [figure])
    return findings
