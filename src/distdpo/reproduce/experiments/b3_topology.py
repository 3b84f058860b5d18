"""B3. Topology and spectral gap: DSGD's consensus distance in a heterogeneity-driven and a noise-driven regime, and
gradient tracking's rounds to reach ε, against the spectral gap 1 − λ of each graph."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from distdpo.report import Figure, Section, Table
from distdpo.reproduce.findings import Findings
from distdpo.reproduce.plotting import band_panel, render_figure, scatter_fit
from distdpo.reproduce.results import Results
from distdpo.reproduce.runs import Plan, Run
from distdpo.reproduce.stats import Verdict, fit_loglog, fit_text, format_number

NAME = "B3"
DSGD = "DSGD"
GRADIENT_TRACKING = "gradient tracking"
# Regimes: consensus driven by heterogeneity (full batch), by gradient noise (minibatch, homogeneous data), and
# gradient tracking's rounds to reach ε.
HETEROGENEITY, NOISE, TRACKING = "heterogeneity", "noise", "tracking"
HETEROGENEITY_REGIME = "full batch, heterogeneity-driven"


def runs(plan: Plan) -> list[Run]:
    scale = plan.scale
    out = []
    for graph in scale.topologies:
        topology = {"graph": graph}
        full = plan.config(
            algorithm=plan.algorithm(name="dsgd", local_steps=1, batch_size=scale.full),
            topology=topology,
            engine=plan.engine(),
        )
        noisy = plan.config(
            data=plan.dataset.homogeneous_data,
            algorithm=plan.algorithm(name="dsgd", local_steps=1, batch_size=scale.batch),
            topology=topology,
            engine=plan.engine(),
        )
        out += plan.seeded(NAME, DSGD, full, regime=HETEROGENEITY, graph=graph)
        out += plan.seeded(NAME, DSGD, noisy, regime=NOISE, graph=graph)
        if not scale.gt_rounds:
            continue  # no rounds-to-ε measurement, the tracking runs' only use
        algorithm = {"name": "gradient_tracking", "rounds": scale.gt_rounds, "local_steps": 1, "batch_size": scale.full}
        tracking = plan.config(
            algorithm=algorithm, topology=topology, engine=plan.engine(max(1, scale.eval_every // 2))
        )
        out += plan.seeded(NAME, GRADIENT_TRACKING, tracking, regime=TRACKING, graph=graph)
    return out


def spectral_gap(run: Run) -> float:
    return run.summary["spectral_gap"]


def squared_mixing_gap(run: Run) -> float:
    """1 − ρ² with ρ = 1 − spectral gap: the code base's form."""
    return 1 - (1 - run.summary["spectral_gap"]) ** 2


def topology_of(run: Run):
    from distdpo.topology import make_topology

    er_p = run.table["topology"].get("er_p") or None
    return make_topology(run.key.graph, run.table["data"]["num_clients"], seed=run.seed, er_p=er_p)


@dataclass
class RoundsToEpsilon:
    """Gradient tracking's first round at or below ε, per graph (NaN: not reached), and the excess over the complete
    graph against the spectral gap."""

    hits: dict[str, list[float]] = field(default_factory=dict)
    gaps: list[float] = field(default_factory=list)
    excess: list[float] = field(default_factory=list)
    censored: list[str] = field(default_factory=list)


def rounds_to_epsilon(results: Results, graphs: list[str], gaps: dict[str, float]) -> RoundsToEpsilon:
    measured = RoundsToEpsilon()
    for graph in graphs:
        for run in results.select(NAME, GRADIENT_TRACKING, regime=TRACKING, graph=graph):
            rounds, values = results.curve(run, results.metric)
            reached = np.flatnonzero(values <= results.scale.eps_rel * values[0])
            measured.hits.setdefault(graph, []).append(float(rounds[reached[0]]) if len(reached) else math.nan)
    reached = [h for hits in measured.hits.values() for h in hits if not math.isnan(h)]
    if not np.isnan(measured.hits.get("complete", [math.nan])).any():
        complete = float(np.mean(measured.hits["complete"]))
    else:
        complete = min(reached) if reached else math.nan
    for graph in graphs:
        if graph == "complete" or gaps[graph] >= 1:
            continue
        tracking = results.select(NAME, GRADIENT_TRACKING, regime=TRACKING, graph=graph)
        for run, hit in zip(tracking, measured.hits.get(graph, [])):
            if math.isnan(hit):
                measured.censored.append(graph)
                continue
            measured.gaps.append(run.summary["spectral_gap"])
            measured.excess.append(hit - complete)
    return measured


@dataclass
class Consensus:
    """DSGD's final consensus distance on every graph in both regimes, and the fits of its dependence on the graph."""

    graphs: list[str]
    driven: dict[str, dict[str, list[Run]]]  # regime → graph → runs
    gaps: dict[str, float]  # graph → spectral gap 1 − λ
    spectral_gap: dict[str, np.ndarray]  # regime → 1 − λ of each fitted run (the complete graph left out)
    final: dict[str, np.ndarray]  # regime → tail mean of each fitted run's consensus distance
    fits: dict[str, dict] = field(default_factory=dict)


def measure_consensus(results: Results) -> Consensus:
    from distdpo import theory

    graphs = list(results.scale.topologies)
    driven = {
        regime: {graph: results.select(NAME, DSGD, regime=regime, graph=graph) for graph in graphs}
        for regime in (HETEROGENEITY, NOISE)
    }
    gaps = {graph: spectral_gap(driven[HETEROGENEITY][graph][0]) for graph in graphs}
    lr = results.base["algorithm"]["lr"]
    spectral_sums: dict[tuple, float] = {}

    def spectral_sum(run: Run) -> float:
        """The linearized stationary consensus distance's sum over the eigenvalues of W (per η², ζ² or σ²)."""
        key = (run.key.graph, run.seed, run.key.regime)
        if key not in spectral_sums:
            mixing = topology_of(run).W
            spectral_sums[key] = theory.dsgd_consensus_spectral(lr, 1.0, mixing, noise=run.key.regime == NOISE)
        return spectral_sums[key]

    fitted = {
        regime: [run for graph in graphs for run in driven[regime][graph] if gaps[graph] < 1]  # complete: Ξ = 0
        for regime in (HETEROGENEITY, NOISE)
    }

    def against(regime: str, variable) -> np.ndarray:
        return np.array([variable(run) for run in fitted[regime]])

    final = {
        regime: np.array([results.floor(run, "consensus_distance") for run in runs]) for regime, runs in fitted.items()
    }
    gap = {regime: against(regime, spectral_gap) for regime in fitted}
    consensus = Consensus(graphs, driven, gaps, gap, final)
    for name, regime, variable, predicted in [
        ("B3_consensus_vs_gap", HETEROGENEITY, spectral_gap, -2.0),
        ("B3_consensus_bound_n", NOISE, spectral_gap, -1.0),
        ("B3_consensus_codebase_h", HETEROGENEITY, squared_mixing_gap, -1.0),
        ("B3_consensus_codebase_n", NOISE, squared_mixing_gap, -1.0),
        ("B3_consensus_spectral_h", HETEROGENEITY, spectral_sum, 1.0),
        ("B3_consensus_spectral_n", NOISE, spectral_sum, 1.0),
    ]:
        consensus.fits[name] = fit_loglog(against(regime, variable), final[regime], predicted)
    return consensus


def claim_consensus(findings: Findings, consensus: Consensus, noise_regime: str) -> None:
    fits = consensus.fits
    for fit, regime in (
        (fits["B3_consensus_vs_gap"], HETEROGENEITY_REGIME),
        (fits["B3_consensus_bound_n"], noise_regime),
    ):
        findings.claimed(
            "DSGD consensus distance decreases with the spectral gap",
            "slope < 0 in 1−λ",
            f"slope {fit_text(fit)}",
            fit["hi"] < 0,
            regime,
        )
    for name, claim, predicted, regime in [
        (
            "B3_consensus_vs_gap",
            "DSGD consensus distance ∝ η²ζ²/(1−λ)² (Koloskova et al. 2020)",
            "slope −2 in 1−λ",
            HETEROGENEITY_REGIME,
        ),
        ("B3_consensus_codebase_h", "code base's form Ξ ∝ η²/(1−ρ²)", "slope −1 in 1−ρ²", HETEROGENEITY_REGIME),
        ("B3_consensus_codebase_n", "code base's form Ξ ∝ η²σ²/(1−ρ²)", "slope −1 in 1−ρ²", noise_regime),
        (
            "B3_consensus_bound_n",
            "DSGD consensus distance ∝ η²σ²/(1−λ) (Koloskova et al. 2020, σ² term)",
            "slope −1 in 1−λ",
            noise_regime,
        ),
        (
            "B3_consensus_spectral_h",
            "Ξ ∝ η²ζ²·mean_k λ_k²/(1−λ_k)² (linearized, all eigenvalues)",
            "slope 1 in the spectral sum",
            HETEROGENEITY_REGIME,
        ),
        (
            "B3_consensus_spectral_n",
            "Ξ ∝ η²σ²·mean_k λ_k²/(1−λ_k²) (linearized, all eigenvalues)",
            "slope 1 in the spectral sum",
            noise_regime,
        ),
    ]:
        findings.fitted(name, claim, predicted, fits[name], regime)


def claim_rounds(findings: Findings, results: Results, tracked: RoundsToEpsilon, fit: dict) -> None:
    scale = results.scale
    if not scale.gt_rounds:
        findings.claimed(
            "rounds to reach ε grow as 1/(1−λ)",
            "slope −1 in 1−λ",
            "not measured",
            Verdict.NOT_TESTABLE_NO_OPTIMUM,
            "without f★ there is no gap to reach ε in, and ‖∇f‖² at the start is no scale for ε (LoRA starts at "
            "B = 0, where the gradient is small)",
        )
        return
    unreached = sorted(set(tracked.censored))
    findings.fitted(
        "B3_rounds_to_eps",
        f"rounds to reach ε = {scale.eps_rel:g}·gap₀ grow as 1/(1−λ)",
        "excess rounds over the complete graph ∝ 1/(1−λ) → slope −1",
        fit,
        "gradient tracking, full batch"
        + (f"; not reached in {scale.gt_rounds} rounds: {', '.join(unreached)}" if unreached else ""),
    )


def analyse(results: Results) -> Findings:
    findings = Findings(NAME)
    consensus = measure_consensus(results)
    noise_regime = f"minibatch, {results.dataset.homogeneous_text} (noise-driven)"
    claim_consensus(findings, consensus, noise_regime)
    # Rounds to ε for gradient tracking (no heterogeneity floor): excess over the complete graph.
    tracked = RoundsToEpsilon()
    if results.scale.gt_rounds:
        tracked = rounds_to_epsilon(results, consensus.graphs, consensus.gaps)
    fit_rounds = fit_loglog(tracked.gaps, tracked.excess, -1.0)
    claim_rounds(findings, results, tracked, fit_rounds)
    findings.sections.append(
        Section(
            "B3. Topology and spectral gap",
            [paragraph(results.dataset.homogeneous_text)],
            [Table(TABLE_HEADERS, table_rows(results, consensus, tracked))],
            figures(results, consensus, tracked, fit_rounds),
        )
    )
    return findings


def figures(results: Results, consensus: Consensus, tracked: RoundsToEpsilon, fit_rounds: dict) -> list[Figure]:
    """The graphs drawn, DSGD's curves on each, and the fits against the spectral gap."""
    scale, graphs, gaps, driven = results.scale, consensus.graphs, consensus.gaps, consensus.driven
    homogeneous = results.dataset.homogeneous_text
    note_heterogeneity = results.config_note(driven[HETEROGENEITY][graphs[0]][0])
    note_noise = results.config_note(driven[NOISE][graphs[0]][0])
    full_text = results.full_batch_text

    def draw_curves(fig, axes):
        heterogeneity_curves = driven[HETEROGENEITY]
        band_panel(
            axes[0],
            results.curves_over_seeds(heterogeneity_curves, "global_loss"),
            log=False,
            ylabel="global loss f(θ̄)",
            legend=True,
            title=f"DSGD, {note_heterogeneity}",
        )
        band_panel(
            axes[1],
            results.curves_over_seeds(heterogeneity_curves, "consensus_distance"),
            log=True,
            ylabel="consensus distance Ξ",
            title=f"DSGD, {note_heterogeneity}",
        )
        band_panel(
            axes[2],
            results.curves_over_seeds(driven[NOISE], "consensus_distance"),
            log=True,
            ylabel="consensus distance Ξ",
            title=f"DSGD, {note_noise}, {homogeneous}",
        )

    def draw_fit(fig, axes):
        gap_h, final = consensus.spectral_gap[HETEROGENEITY], consensus.final[HETEROGENEITY]
        scatter_fit(
            axes[0],
            gap_h,
            final,
            consensus.fits["B3_consensus_vs_gap"],
            f"heterogeneity-driven ({full_text})",
            "spectral gap 1 − λ",
            "final Ξ",
        )
        scatter_fit(
            axes[0],
            consensus.spectral_gap[NOISE],
            consensus.final[NOISE],
            consensus.fits["B3_consensus_bound_n"],
            f"noise-driven (B={scale.batch}, {homogeneous})",
            "spectral gap 1 − λ",
            "final Ξ",
        )
        for graph in graphs:
            if gaps[graph] < 1:
                at_gap = gap_h == gaps[graph]
                axes[0].annotate(graph, (gaps[graph], np.mean(final[at_gap]) if at_gap.any() else 1), fontsize=6)
        axes[0].set_title("final consensus distance vs spectral gap", fontsize=8)
        if len(axes) < 2:
            return
        if len(tracked.gaps) and tracked.hits:
            scatter_fit(
                axes[1],
                np.array(tracked.gaps),
                np.array(tracked.excess),
                fit_rounds,
                "gradient tracking",
                "spectral gap 1 − λ",
                "rounds to ε − rounds(complete)",
            )
        axes[1].set_title(f"rounds to ε = {scale.eps_rel:g}·gap₀ (GT, {full_text})", fontsize=8)

    def draw_graphs(fig, axes):
        import networkx as nx

        circular = ("ring", "path", "complete", "exponential", "erdos_renyi")
        for ax, graph in zip(axes, graphs):
            topology = topology_of(driven[HETEROGENEITY][graph][0])
            layout = nx.circular_layout if graph in circular else nx.kamada_kawai_layout
            nx.draw_networkx(
                topology.graph,
                pos=layout(topology.graph),
                ax=ax,
                node_size=40,
                with_labels=False,
                width=0.6,
                node_color="#4c72b0",
            )
            ax.set_title(f"{graph}\n1−λ = {gaps[graph]:.3g}", fontsize=8)
            ax.set_axis_off()

    seeds = results.seeds_note()
    curves = render_figure(
        "b3_topology_curves",
        "B3. DSGD (E = 1) on each topology: loss and consensus distance vs rounds; "
        f"left two: {note_heterogeneity}; right: {note_noise}, {homogeneous}; {seeds}.",
        draw_curves,
        ncols=3,
        width=4.4,
    )
    fits = render_figure(
        "b3_spectral_gap",
        "B3. Final consensus distance (tail mean) vs spectral gap, both regimes"
        + (", and gradient tracking's rounds to ε vs spectral gap" if scale.gt_rounds else "")
        + "; complete graph (1−λ = 1, Ξ = 0) is left out of the log-log fits.",
        draw_fit,
        ncols=2 if scale.gt_rounds else 1,
    )
    drawn = render_figure(
        "b3_graphs",
        "B3. The graphs (Metropolis–Hastings weights) with their spectral gaps.",
        draw_graphs,
        ncols=len(graphs),
        width=2.0,
        height=2.3,
    )
    return [drawn, curves, fits]


TABLE_HEADERS = ["graph", "1−λ", "Ξ (ζ-driven)", "Ξ (noise-driven)", "GT rounds to ε"]


def table_rows(results: Results, consensus: Consensus, tracked: RoundsToEpsilon) -> list[list[str]]:
    out = []
    for graph in consensus.graphs:
        by_regime = [
            float(np.mean([results.floor(run, "consensus_distance") for run in consensus.driven[regime][graph]]))
            for regime in (HETEROGENEITY, NOISE)
        ]
        reached = [h for h in tracked.hits.get(graph, []) if not math.isnan(h)]
        if reached:
            rounds = format_number(float(np.mean(reached)))
        else:
            rounds = f"> {results.scale.gt_rounds}" if graph in tracked.hits else "–"
        out.append([graph, format_number(consensus.gaps[graph], 4), *map(format_number, by_regime), rounds])
    return out


def paragraph(homogeneous: str) -> str:
    identical = (
        "identical users (ζ = 0, " if homogeneous == "ζ = 0" else f"an IID split of the same data ({homogeneous}, "
    )
    return (
        "Two regimes: full batch with heterogeneous users (the consensus distance is driven by ζ²) and minibatches "
        "with " + identical + "driven by the gradient noise σ²). Three forms are held against the data: the bound "
        "η²ζ²/(1−λ)² of Koloskova et al. (2020), the code base's η²/(1−ρ²) and the linearized stationary value "
        "η²ζ²·mean_k λ_k²/(1−λ_k)² (noise: η²σ²·mean_k λ_k²/(1−λ_k²)) over all eigenvalues of W. The bound of "
        "Koloskova et al. has a σ² term η²σ²/(1−λ) (exponent −1) and a ζ² term η²ζ²/(1−λ)² (exponent −2)."
    )
