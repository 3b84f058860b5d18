"""B6 on a language model: the three LoRA aggregation modes across Dirichlet skews, with ``lora_aggregation_error``
along each run (part of experiment B6; :mod:`b6_communication` runs it on datasets with a causal LM)."""

from __future__ import annotations

import numpy as np

from distdpo.report import Table
from distdpo.reproduce.findings import Findings
from distdpo.reproduce.plotting import band_panel, render_figure
from distdpo.reproduce.results import Results
from distdpo.reproduce.runs import Plan, Run
from distdpo.reproduce.stats import format_number, linear_trend, trend_verdict

NAME = "B6"
MODES = ("factors", "freeze_a", "product")
LOCAL_STEPS = 4  # enough local steps for the clients' factors to part ways within a round
EXACT = 1e-6  # freeze_a's error is a float rounding of ‖Σ p_i B_i A − B̄ A‖: far below this

ABOUT = (
    "Averaging LoRA factors is not averaging updates: FedAvg of A and B gives B̄Ā ≠ Σ p_i B_i A_i, and the difference "
    "Σ p_i (B_i − B̄)(A_i − Ā) is the clients' factor covariance, larger the more their data differ. FFA-LoRA "
    "(freeze_a) keeps A at its seeded value everywhere, so the average of B is the average of the products; "
    "product forms Σ p_i B_i A_i and keeps its best rank-r part, losing only the SVD's tail. "
    "lora_aggregation_error is ‖Σ p_i B_i A_i − (what the server keeps)‖_F / ‖Σ p_i B_i A_i‖_F. Its trend with "
    "heterogeneity is read at round 1, where every client starts from the same adapter (B = 0): later rounds divide "
    "by a ‖Σ p_i B_i A_i‖ that grows with how far training went, which itself depends on the split."
)


def lora_series(mode: str) -> str:
    return f"LoRA {mode}"


def runs(plan: Plan) -> list[Run]:
    scale = plan.scale
    out = []
    for skew in scale.lora_skews:
        for mode in MODES:
            algorithm = plan.algorithm(
                name="fedavg",
                rounds=max(3, scale.rounds // 2),
                local_steps=LOCAL_STEPS,
                batch_size=scale.full,
                aggregation="uniform",  # size weights would hide the skew: at small α one client holds most pairs
                lora_aggregation=mode,
            )
            table = plan.config(data={"dirichlet_alpha": 1.0 / skew}, algorithm=algorithm, engine=plan.engine(1))
            out += plan.seeded(NAME, lora_series(mode), table, x=skew)
    return out


def mean_error(run: Run) -> float:
    """The run's lora_aggregation_error averaged over its rounds."""
    values = [row["lora_aggregation_error"] for row in run.rows if row["round"] > 0]
    values = [v for v in values if np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def first_error(run: Run) -> float:
    """lora_aggregation_error of round 1: one aggregation from a start every client shares."""
    return next(float(row["lora_aggregation_error"]) for row in run.rows if row["round"] == 1)


def analyse(results: Results) -> Findings:
    findings = Findings(NAME)
    skews = results.scale.lora_skews
    by_mode = {mode: results.select(NAME, lora_series(mode)) for mode in MODES}
    regime = (
        f"FedAvg, E = {LOCAL_STEPS}, B = {results.scale.full}, uniform weights, LoRA r = "
        f"{results.base['policy'].get('lora_r')}, Dirichlet skew 1/α ∈ {{{', '.join(f'{s:g}' for s in skews)}}}"
    )
    frozen = [mean_error(run) for run in by_mode["freeze_a"]]
    findings.claimed(
        "freeze_a (FFA-LoRA) has no factor-averaging error",
        f"error ≤ {EXACT:g} on every run",
        f"max {format_number(max(frozen))}",
        max(frozen) <= EXACT,
        regime,
    )
    level = {
        mode: {s: float(np.mean([mean_error(r) for r in runs if r.x == s])) for s in skews}
        for mode, runs in by_mode.items()
    }
    findings.claimed(
        "product keeps only its rank-r truncation, less than factor averaging loses",
        "truncation residual < factors' error at every skew",
        "; ".join(f"1/α={s:g}: {residual(level, s)}" for s in skews),
        all(level["product"][s] < level["factors"][s] for s in skews),
        regime,
    )
    factors = by_mode["factors"]
    skew_of, first = np.array([run.x for run in factors]), np.array([first_error(run) for run in factors])
    fit = linear_trend(np.log(skew_of), np.log(first))
    findings.fits["B6_lora_error_vs_skew"] = fit
    findings.claimed(
        "the factor-averaging error grows as α falls",
        "slope > 0 of log error (round 1) on log(1/α)",
        f"slope {format_number(fit['slope'])} [{format_number(fit['lo'])}, {format_number(fit['hi'])}], "
        f"R²={format_number(fit['r2'], 2)}, n={fit['n']}",
        trend_verdict(fit),
        regime,
    )

    def draw(fig, axes):
        groups = {f"factors, 1/α = {s:g}": results.select(NAME, lora_series("factors"), x=s) for s in skews}
        groups[f"product, 1/α = {skews[-1]:g}"] = results.select(NAME, lora_series("product"), x=skews[-1])
        results.panel(axes[0], groups, "B6 · LoRA aggregation error per round", "lora_aggregation_error", "error")
        axes[1].scatter(skew_of, first, s=18, label="factors, round 1 (each seed)")
        for mode in ("factors", "product"):
            axes[1].plot(skews, [level[mode][s] for s in skews], marker="o", label=f"{mode}, mean over rounds")
        axes[1].set_xscale("log")
        axes[1].set_yscale("log")
        axes[1].set_xlabel("Dirichlet skew 1/α")
        axes[1].set_ylabel("lora_aggregation_error")
        axes[1].legend(fontsize=7)
        axes[1].set_title("B6 · error against heterogeneity (freeze_a: 0)", fontsize=8)
        curves = {mode: results.curves_over_seeds({mode: runs}, "global_loss")[mode] for mode, runs in by_mode.items()}
        band_panel(axes[2], curves, log=False, ylabel="global loss f(θ̄)", legend=True, title="B6 · loss, all skews")

    caption = (
        f"B6 (LoRA). Left: lora_aggregation_error per round, factor averaging at each skew and product at the largest. "
        "Middle: factor averaging's round-1 error (each seed) and each mode's mean over rounds against the skew "
        f"(freeze_a's is ≤ {EXACT:g}, off a log axis). Right: the "
        f"global loss of each mode, every skew; {results.config_note(factors[0])}; {results.seeds_note()}."
    )
    figure = render_figure("b6_lora_aggregation", caption, draw, ncols=3, width=4.6)
    rows = [
        [
            f"{s:g}",
            format_number(float(np.mean(first[skew_of == s]))),
            *(format_number(level[m][s]) for m in MODES),
            *(final_loss(by_mode[m], s) for m in MODES),
        ]
        for s in skews
    ]
    headers = ["1/α", "error factors, round 1", *(f"error {m}" for m in MODES), *(f"final loss {m}" for m in MODES)]
    table = Table(headers, rows, "means over seeds; errors over rounds unless marked round 1; loss of the last round")
    findings.section("B6. LoRA aggregation across heterogeneity", ABOUT, [figure], [table])
    return findings


def residual(level: dict, skew: float) -> str:
    return f"{format_number(level['product'][skew])} vs {format_number(level['factors'][skew])}"


def final_loss(runs: list[Run], skew: float) -> str:
    return format_number(float(np.mean([run.rows[-1]["global_loss"] for run in runs if run.x == skew])))
