"""The problem instance of experiments A/B1 and the theory's quantities on it (L, μ, ζ², σ², spectral gaps)."""

from __future__ import annotations

from distdpo.config import from_dict
from distdpo.report import Section, Table
from distdpo.reproduce.experiments import b1_local_steps, b3_topology
from distdpo.reproduce.findings import Findings
from distdpo.reproduce.results import Results
from distdpo.reproduce.runs import Plan, Run
from distdpo.reproduce.stats import format_number

NAME = "theory"

# key in the theory instance → (what it is, how it is computed)
QUANTITIES = [
    ("L_bound", "L (closed-form bound β²/4·λ_max(Σ p_i/N_i Σ z zᵀ))", "theory.smoothness_bound"),
    ("L_power_at_theta_star", "λ_max(∇²f(θ★)) by power iteration", "theory.hessian_top_eigenvalue (HVPs)"),
    ("L_eig_at_theta_star", "λ_max(∇²f(θ★)) by eigvalsh of the full Hessian", "torch.autograd.functional.hessian"),
    ("L_power_at_reference", "λ_max(∇²f(θ_ref)) by power iteration", "theory.hessian_top_eigenvalue"),
    (
        "L_fd_at_reference",
        "|λ|_max(∇²f(θ_ref)) by power iteration on finite-difference HVPs (fixed loss pairs)",
        "theory.hessian_top_eigenpair_fd",
    ),
    ("mu_at_theta_star", "μ = λ_min(∇²f(θ★))", "eigvalsh"),
    ("heterogeneity_at_theta_star", "ζ² at θ★", "theory.heterogeneity"),
    ("heterogeneity_at_reference", "ζ² at θ_ref (start)", "theory.heterogeneity"),
    ("grad_noise", "σ² per pair at θ★", "theory.grad_noise"),
    ("grad_noise_at_reference", "σ² per pair at θ_ref (start)", "theory.grad_noise"),
    ("num_params", "trainable parameters", "task.num_params"),
]


def runs(plan: Plan) -> list[Run]:
    return []  # measured on the instance of B1's first run


def instance_quantities(results: Results, run: Run) -> dict:
    from distdpo import build, theory

    cfg = from_dict(run.table)
    task = results.cache.task(cfg)
    weights = build.client_weights(cfg, task.client_sizes)
    optimum = results.cache.optimum(cfg, task, weights)
    if getattr(task, "convex", False) and hasattr(task, "objective"):
        return theory.instance(task, weights, optimum.theta if optimum is not None else None)
    reference = task.initial_params()
    quantities = {
        "num_clients": task.num_clients,
        "num_params": task.num_params,
        "heterogeneity_at_reference": theory.heterogeneity(task, weights, reference),
    }
    if hasattr(task, "full_gradient"):
        eigenvalue, _ = theory.hessian_top_eigenpair_fd(lambda t: task.full_gradient(t, weights), reference)
        quantities["L_fd_at_reference"] = abs(eigenvalue)
    if hasattr(task, "grad_noise"):
        quantities["grad_noise_at_reference"] = theory.grad_noise(task, reference)
    return quantities


def topology_rows(results: Results) -> list[list[str]]:
    """B3's graphs with their spectral gaps, where the dataset runs B3."""
    if b3_topology.NAME not in results.dataset.experiments:
        return []
    rows = []
    for graph in results.scale.topologies:
        first = results.select(b3_topology.NAME, regime=b3_topology.HETEROGENEITY, graph=graph)[0]
        t = first.summary.get("topology")
        if t:
            lam, gap = format_number(t["lambda"], 4), format_number(t["spectral_gap"], 4)
            rows.append([graph, str(t["num_nodes"]), str(t["num_edges"]), lam, gap])
    return rows


def analyse(results: Results) -> Findings:
    findings = Findings(NAME)
    run = results.select(b1_local_steps.NAME)[0]
    quantities = instance_quantities(results, run)
    quantities["config"] = results.config_note(run)
    findings.theory = quantities
    table = [[label, format_number(quantities.get(k), 4), how] for k, label, how in QUANTITIES if k in quantities]
    if "L_bound" in quantities:
        how = (
            "L bounds the curvature everywhere; the power iteration and the full-Hessian eigenvalue must agree with "
            "each other and stay below the bound."
        )
    else:
        how = (
            "No closed-form L exists for a language model: the local curvature at the start is estimated by power "
            "iteration on finite-difference Hessian-vector products of the gradient on the fixed loss pairs."
        )
    instance = quantities["config"].replace(", full batch", "")
    section = Section(
        "Problem instance and theory quantities",
        [f"Instance of experiments A/B1 (seed 0): {instance}. " + how],
        [Table(["quantity", "value", "how"], table)],
    )
    graphs = topology_rows(results)
    if graphs:
        section.tables.append(
            Table(
                ["graph", "n", "edges", "λ", "spectral gap 1−λ"],
                graphs,
                "Metropolis–Hastings weights; spectral gap = theory.spectral_gap(topology).",
            )
        )
    findings.sections.append(section)
    return findings
