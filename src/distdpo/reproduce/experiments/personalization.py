"""P. Personalization: what the shared model costs each user, held out, against each client's own optimum.

No runs of its own: it reads the ``personalization_gap`` every log-linear run's summary holds (see
:mod:`distdpo.personalization`) for the methods of A, at θ★ (B1's E = 1 runs: gradient descent to the optimum)
and along B5's heterogeneity sweep (gradient tracking, which reaches θ★ of its objective at every level).
"""

from __future__ import annotations

import numpy as np

from distdpo.report import Table
from distdpo.reproduce.experiments import a_comparative, b1_local_steps, b5_heterogeneity
from distdpo.reproduce.findings import Findings
from distdpo.reproduce.plotting import render_figure
from distdpo.reproduce.results import Results
from distdpo.reproduce.runs import Plan, Run
from distdpo.reproduce.stats import format_number, linear_trend, trend_verdict

NAME = "P"

ABOUT = (
    "Each client's own optimum θ_i★ minimizes its loss alone (a Newton solve on its pairs); its personalization gap "
    "is acc_i(θ_i★) − acc_i(θ̄), the held-out preference accuracy it would gain with a model of its own (negative: "
    "the shared model, trained on everyone's pairs, predicts its held-out pairs better). Clients whose pairs are "
    "separable have no finite own optimum and are left out (counted in summary.json)."
)


def runs(plan: Plan) -> list[Run]:
    return []  # reads the runs of A, B1 and B5


def gap_of(run: Run) -> dict:
    return run.summary.get("personalization_gap") or {}


def counted(runs: list[Run]) -> list[dict]:
    """The gaps of the runs that have one (some client with an own optimum and held-out pairs)."""
    return [gap for gap in map(gap_of, runs) if gap.get("mean") is not None]


def table_row(name: str, runs: list[Run]) -> list[str]:
    gaps = counted(runs)
    if not gaps:
        return [name, "–", "–", "–", "–", "no client with an own optimum"]
    mean = lambda key: format_number(float(np.mean([g[key] for g in gaps])))  # noqa: E731
    worst = sorted({g["worst_client"] for g in gaps})
    return [name, mean("shared_accuracy"), mean("own_accuracy"), mean("mean"), mean("worst"), ", ".join(worst)]


def analyse(results: Results) -> Findings:
    findings = Findings(NAME)
    methods = {
        name: results.select(a_comparative.NAME, name) for name in a_comparative.series_names(results.num_clients)
    }
    at_optimum = results.select(b1_local_steps.NAME, x=1)
    rows = [table_row(name, runs) for name, runs in methods.items()]
    rows.append(table_row("θ★ (B1, E = 1)", at_optimum))
    optimum_gaps = counted(at_optimum)
    worst = [g["worst"] for g in optimum_gaps]
    findings.claimed(
        "the shared optimum θ★ costs some user held-out accuracy (the premise of personalized DPO)",
        "worst-client gap acc_i(θ_i★) − acc_i(θ★) > 0 on every seed",
        f"worst gap by seed {', '.join(format_number(v) for v in worst) or '–'}; mean gap by seed "
        f"{', '.join(format_number(g['mean']) for g in optimum_gaps) or '–'}",
        bool(worst) and min(worst) > 0,
        "θ★ (full-batch gradient descent), held-out pairs",
    )
    tracking = [run for run in results.select(b5_heterogeneity.NAME, b5_heterogeneity.TRACKING_RING) if counted([run])]
    zeta = np.array([b5_heterogeneity.measured_heterogeneity(run) for run in tracking], float)
    mean_gap = np.array([gap_of(run)["mean"] for run in tracking], float)
    fit = linear_trend(np.log(np.maximum(zeta, 1e-300)), mean_gap)
    findings.fits["P_gap_vs_zeta"] = fit
    findings.claimed(
        "users lose more to the shared model the more they differ: the mean gap grows with ζ²",
        "slope > 0 in log ζ²(θ★)",
        f"slope {format_number(fit['slope'])} [{format_number(fit['lo'])}, {format_number(fit['hi'])}] per e-fold "
        f"of ζ², R²={format_number(fit['r2'], 2)}, n={fit['n']}",
        trend_verdict(fit),
        f"θ★ of B5's gradient tracking on a ring, {results.dataset.heterogeneity_name} swept",
    )

    def draw(fig, axes):
        first = optimum_gaps[0] if optimum_gaps else {}
        per_client = first.get("per_client", {})
        axes[0].bar(range(len(per_client)), list(per_client.values()))
        axes[0].set_xticks(range(len(per_client)), list(per_client), rotation=60, fontsize=6)
        axes[0].axhline(0, color="k", linewidth=0.8)
        axes[0].set_ylabel("acc_i(θ_i★) − acc_i(θ★)")
        axes[0].set_title("per-client gap at θ★ (seed 0)", fontsize=8)
        axes[1].scatter(zeta, mean_gap, s=18)
        axes[1].set_xscale("log")
        axes[1].axhline(0, color="k", linewidth=0.8)
        axes[1].set_xlabel("ζ² at θ★ (measured)")
        axes[1].set_ylabel("mean gap over clients")
        axes[1].set_title(f"B5 sweep, gradient tracking at θ★ · {results.seeds_note()}", fontsize=8)

    caption = (
        "P. Personalization gap: held-out accuracy of each client's own optimum minus the shared model's; "
        f"{results.config_note(at_optimum[0])}."
    )
    figure = render_figure("p_personalization", caption, draw, ncols=2)
    headers = ["model", "shared acc.", "own acc.", "mean gap", "worst gap", "worst client(s)"]
    findings.section("P. Personalization gap", ABOUT, [figure], [Table(headers, rows, "means over seeds")])
    return findings
