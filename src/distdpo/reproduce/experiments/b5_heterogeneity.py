"""B5. Heterogeneity ζ² swept (FedAvg, FedAvg with sampling, SCAFFOLD, DSGD, gradient tracking), and the number of
clients swept up to 1,000 (the noise floor vs n with full participation and with S fixed). The dataset says what a
level is (:attr:`~distdpo.reproduce.datasets.Dataset.heterogeneity_data`, ``clients_data``): the synthetic model's
heterogeneity and number of users, or the Dirichlet skew and the number of clients of a real data set."""

from __future__ import annotations

import math

import numpy as np

from distdpo.report import Table
from distdpo.reproduce.findings import Findings
from distdpo.reproduce.plotting import band_panel, render_figure, scatter_fit
from distdpo.reproduce.results import Results
from distdpo.reproduce.runs import Plan, Run
from distdpo.reproduce.stats import Verdict, fit_loglog, fit_text, format_number

NAME = "B5"
CLIENTS_SWEEP = "B5n"  # the number-of-clients sweep: its runs are named apart from the heterogeneity sweep's
FEDAVG, SCAFFOLD, DSGD_RING, TRACKING_RING = "FedAvg", "SCAFFOLD", "DSGD ring", "gradient tracking ring"
FEDAVG_EVERY_CLIENT = "FedAvg full participation"


ABOUT_CORRECTION = (
    "SCAFFOLD's control variates and gradient tracking's trackers cancel the clients' gradient disagreement, so "
    "their full-batch runs converge to θ★ at every ζ²."
)
ABOUT_NUM_CLIENTS = (
    "Each client holds the same number of pairs; with every client participating, a round averages n·B stochastic "
    "gradients, so the noise floor falls as 1/n; with S fixed it does not."
)


def sampled_clients(num_clients: int) -> int:
    return max(1, num_clients // 4)


def fedavg_sampled(clients_per_round: int) -> str:
    return f"FedAvg S={clients_per_round}"


def heterogeneity_series(num_clients: int) -> list[str]:
    return [FEDAVG, fedavg_sampled(sampled_clients(num_clients)), SCAFFOLD, DSGD_RING, TRACKING_RING]


def clients_series(scale) -> list[str]:
    return [FEDAVG_EVERY_CLIENT, fedavg_sampled(scale.clients_sweep_per_round)]


def runs(plan: Plan) -> list[Run]:
    scale, full = plan.scale, plan.scale.full
    engine = plan.engine()
    out = []
    for level in scale.heterogeneity:
        data = plan.dataset.heterogeneity_data(level)
        sampled = sampled_clients(plan.num_clients)
        drift_local_steps = scale.local_steps + 1
        series_algorithms = [
            (FEDAVG, None, plan.algorithm(name="fedavg", local_steps=drift_local_steps, batch_size=full)),
            (
                fedavg_sampled(sampled),
                None,
                plan.algorithm(name="fedavg", local_steps=1, batch_size=full, clients_per_round=sampled),
            ),
            (SCAFFOLD, None, plan.algorithm(name="scaffold", local_steps=drift_local_steps, batch_size=full)),
            (DSGD_RING, "ring", plan.algorithm(name="dsgd", local_steps=1, batch_size=full)),
            (TRACKING_RING, "ring", plan.algorithm(name="gradient_tracking", local_steps=1, batch_size=full)),
        ]
        for series, graph, algorithm in series_algorithms:
            topology = {"topology": {"graph": graph}} if graph else {}
            table = plan.config(data=data, algorithm=algorithm, **topology, engine=engine)
            out += plan.seeded(NAME, series, table, x=level, graph=graph)
    every = max(scale.eval_every, 10)
    per_round = scale.clients_sweep_per_round
    for clients in scale.num_clients_sweep:
        data = plan.dataset.clients_data(clients, scale)
        every_client = plan.algorithm(name="fedavg", local_steps=1, batch_size=scale.batch)
        sampled = plan.algorithm(
            name="fedavg", local_steps=1, batch_size=scale.batch, clients_per_round=min(clients, per_round)
        )
        out += plan.seeded(
            CLIENTS_SWEEP,
            FEDAVG_EVERY_CLIENT,
            plan.config(data=data, algorithm=every_client, engine=plan.engine(every)),
            x=clients,
        )
        out += plan.seeded(
            CLIENTS_SWEEP,
            fedavg_sampled(per_round),
            plan.config(data=data, algorithm=sampled, engine=plan.engine(every)),
            x=clients,
        )
    return out


def measured_heterogeneity(run: Run) -> float:
    """ζ² at θ★, as the run measured it."""
    return run.summary["heterogeneity"]


def floors_by_level(results: Results, runs: list[Run]) -> tuple[np.ndarray, np.ndarray]:
    """The mean measured ζ² at each swept level, and the floors: one row per seed, one column per level."""
    levels = sorted({run.x for run in runs})
    zeta = np.array([np.mean([measured_heterogeneity(r) for r in runs if r.x == level]) for level in levels])
    floors = np.full((results.seeds, len(levels)), math.nan)
    for run in runs:
        floors[run.seed, levels.index(run.x)] = results.floor(run)
    return zeta, floors


def analyse_heterogeneity(results: Results, findings: Findings) -> None:
    scale = results.scale
    series = heterogeneity_series(results.num_clients)
    groups = {name: results.select(NAME, name) for name in series}
    first = groups[FEDAVG][0]
    level_name = results.dataset.heterogeneity_name
    note = results.config_note(first).replace(f"ζ-scale={first.table['data'].get('heterogeneity')}", "ζ-scale swept")
    for name, fit_name, claim, regime in [
        (FEDAVG, "B5_fedavg_zeta", "FedAvg drift floor grows with ζ²", f"full batch, E = {scale.local_steps + 1}"),
        (series[1], "B5_partial_zeta", "partial-participation floor ∝ ζ²", "full batch, E = 1"),
        (DSGD_RING, "B5_dsgd_zeta", "DSGD floor ∝ η²ζ²/(1−λ)² grows with ζ²", "full batch, E = 1, ring"),
    ]:
        zeta = np.array([measured_heterogeneity(run) for run in groups[name]], float)
        floors = np.array([results.floor(run) for run in groups[name]], float)
        findings.fitted(fit_name, claim, "floor ∝ ζ² → slope 1 in ζ²(θ★)", fit_loglog(zeta, floors, 1.0), regime)
    top = max(run.x for runs in groups.values() for run in runs)
    for corrected, plain in ((SCAFFOLD, FEDAVG), (TRACKING_RING, DSGD_RING)):
        ratios = []
        for run in groups[corrected]:
            match = results.select(NAME, plain, x=run.x, seed=run.seed)[0]
            ratios.append(results.floor(run) / max(results.floor(match), 1e-300))
        worst = max(ratios)
        if worst < 1e-2:
            outcome = Verdict.HOLDS
        else:
            outcome = Verdict.DIRECTION_ONLY if worst < 1 else Verdict.DOES_NOT_HOLD
        findings.claimed(
            f"{corrected} removes the ζ² floor of {plain}",
            "floor(corrected) ≪ floor(plain) at every ζ²",
            f"max ratio {format_number(worst)} over {len(ratios)} runs",
            outcome,
            "full batch, same E / graph",
        )
    tracking = [results.floor(run) for run in results.select(NAME, TRACKING_RING, x=top)]
    dsgd = [results.floor(run) for run in results.select(NAME, DSGD_RING, x=top)]
    findings.claimed(
        "gradient tracking beats DSGD at high ζ²",
        "floor(GT) < floor(DSGD)",
        f"GT {format_number(float(np.mean(tracking)))} vs DSGD {format_number(float(np.mean(dsgd)))} "
        f"at {level_name} {top:g}",
        np.mean(tracking) < np.mean(dsgd),
        "full batch, ring",
    )
    seeds = results.seeds_note()

    def draw(fig, axes):
        band_panel(
            axes[0],
            {name: floors_by_level(results, runs) for name, runs in groups.items()},
            log=True,
            log_x=True,
            xlabel="ζ² at θ★ (measured)",
            marker="o",
        )
        axes[0].set_ylabel(f"floor of {results.metric_label}")
        axes[0].legend(fontsize=7)
        axes[0].set_title(f"B5 · heterogeneity sweep · {note} · {seeds}", fontsize=8)
        at_top = {name: [run for run in runs if run.x == top] for name, runs in groups.items()}
        band_panel(
            axes[1],
            results.curves_over_seeds(at_top, results.metric),
            log=True,
            ylabel=results.metric_label,
            title=f"runs at {level_name} {top:g}",
        )

    caption = (
        f"B5. Floors vs measured ζ² for FedAvg (E = {scale.local_steps + 1}), FedAvg with partial participation "
        f"(E = 1), SCAFFOLD, DSGD and gradient tracking on a ring; full batch; {note}; {seeds}."
    )
    figure = render_figure("b5_heterogeneity", caption, draw, ncols=2)
    about = results.dataset.heterogeneity_about + ABOUT_CORRECTION
    findings.section("B5. Heterogeneity and drift correction", about, [figure])


def milliseconds_per_round(runs: list[Run]) -> float:
    """Simulator time per round, mean over the runs."""
    return 1000 * float(np.mean([run.rows[-1]["wall_time_s"] / run.table["algorithm"]["rounds"] for run in runs]))


def analyse_num_clients(results: Results, findings: Findings) -> None:
    scale = results.scale
    every_client, sampled = clients_series(scale)
    groups = {name: results.select(CLIENTS_SWEEP, name) for name in (every_client, sampled)}
    last = groups[every_client][-1]
    note = results.config_note(last).replace(f"n={last.table['data']['num_clients']}", "n swept")
    points = {
        name: (np.array([run.x for run in runs], float), np.array([results.floor(run) for run in runs], float))
        for name, runs in groups.items()
    }
    fits = {every_client: fit_loglog(*points[every_client], -1.0), sampled: fit_loglog(*points[sampled], 0.0)}
    findings.fitted(
        "B5_clients_full",
        "linear speedup: full-participation noise floor ∝ 1/n",
        "floor ∝ η σ²/(nB) → slope −1 in n",
        fits[every_client],
        "minibatch, E = 1",
    )
    fixed = fits[sampled]
    findings.fits["B5_clients_fixed_S"] = fixed
    findings.claimed(
        f"with S = {scale.clients_sweep_per_round} clients per round, more clients bring no speedup: the floor does "
        "not fall with n",
        "floor ∝ σ²/(SB) + ζ²(1/S − 1/n): flat or rising in n (slope ≥ 0, not −1)",
        f"slope {fit_text(fixed)}",
        math.isfinite(fixed["hi"]) and fixed["hi"] >= 0,
        "minibatch, E = 1",
    )
    rows = []
    for name, runs in groups.items():
        for level in sorted({run.x for run in runs}):
            at_level = [run for run in runs if run.x == level]
            floor = format_number(float(np.mean([results.floor(run) for run in at_level])))
            rows.append([name, str(int(level)), floor, f"{milliseconds_per_round(at_level):.2f}"])
    seeds = results.seeds_note()

    def draw(fig, axes):
        for name, runs in groups.items():
            scatter_fit(
                axes[0], *points[name], fits[name], name, "number of clients n", f"floor of {results.metric_label}"
            )
            levels = sorted({run.x for run in runs})
            times = [milliseconds_per_round([run for run in runs if run.x == level]) for level in levels]
            axes[1].plot(levels, times, marker="o", label=name)
        axes[0].set_title(f"B5 · clients sweep · {note} · {seeds}", fontsize=8)
        axes[1].set_xscale("log")
        axes[1].set_yscale("log")
        axes[1].set_xlabel("number of clients n")
        axes[1].set_ylabel("simulator ms per round")
        axes[1].grid(True, alpha=0.3, which="both")
        axes[1].legend(fontsize=7)

    caption = (
        f"B5. FedAvg with up to {max(scale.num_clients_sweep)} clients: floor vs n with full participation and with "
        f"S fixed, and simulator time per round; {note}; {seeds}."
    )
    figure = render_figure("b5_num_clients", caption, draw, ncols=2)
    table = Table(["method", "n", "floor (tail mean)", "ms / round"], rows)
    findings.section("B5. Number of clients", ABOUT_NUM_CLIENTS, [figure], [table])


def analyse(results: Results) -> Findings:
    findings = Findings(NAME)
    if results.scale.heterogeneity:
        analyse_heterogeneity(results, findings)
    if results.scale.num_clients_sweep:
        analyse_num_clients(results, findings)
    return findings
