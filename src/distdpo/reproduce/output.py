"""What a suite leaves in its directory: metrics.csv, summary.json and the report (HTML and Markdown)."""

from __future__ import annotations

import math
import os
import platform
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from distdpo.io import write_csv_atomic, write_json_atomic
from distdpo.metrics import COLUMNS
from distdpo.report import Report, Section, Table, write_report
from distdpo.reproduce.findings import Claim
from distdpo.reproduce.stats import Verdict

if TYPE_CHECKING:
    from distdpo.reproduce.suite import Suite

RUN_COLUMNS = ["experiment", "group", "x", "seed"]  # added to every metrics row


def claim_table(claims: list[Claim]) -> Table:
    return Table(
        ["exp.", "claim", "predicted dependence", "measured (fitted slope [95% CI])", "verdict", "regime"],
        [c.row() for c in claims],
        "Fits: least squares of log(measured) on log(variable) over every seed's point; CI = stderr × t(0.975, n−2). "
        "'holds' = the predicted exponent lies in the CI; 'direction only' = right sign, significant, other exponent; "
        "'does not hold' = wrong sign or a contradicting measurement.",
    )


def machine() -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    return {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_at_end": list(load),
    }


def claims_paragraph(suite: Suite) -> str:
    claims = suite.claims
    holds = sum(c.verdict is Verdict.HOLDS for c in claims)
    untestable = sum(not c.verdict.testable for c in claims)
    counted = f"{holds} of {len(claims) - untestable} testable claims hold as stated" + (
        f" ({untestable} cannot be tested on this dataset; their rows say why)" if untestable else ""
    )
    return (
        f"{counted}. Curves are means over seeds with a min–max band; a floor is the mean of the last half of the "
        "evaluated rounds for stochastic runs (minibatches or client sampling) and of the last tenth for "
        "deterministic ones. Where a claim does not hold, the row says so with the numbers." + suite.claims_note
    )


def write_outputs(suite: Suite, out: Path, wall_time_s: float, command: str) -> Path:
    finished = [run for run in suite.runs if run.finished]
    rows = [r for run in finished for r in run.rows]
    extra = sorted({k for r in rows for k in r} - set(COLUMNS) - set(RUN_COLUMNS))
    write_csv_atomic(out / "metrics.csv", rows, COLUMNS + RUN_COLUMNS + extra)
    host = machine()
    reused = [run for run in suite.runs if run.reused]
    run_seconds = float(sum(run.seconds for run in finished))
    summary = {
        "dataset": suite.dataset.name,
        "description": suite.dataset.description,
        "seeds": suite.seeds,
        "quick": suite.quick,
        "command": command,
        "wall_time_s": wall_time_s,
        "machine": host,
        "metric": suite.results.metric,
        "theory": suite.theory,
        "fits": suite.fits,
        "claims": [c.as_dict() for c in suite.claims],
        "failed_runs": dict(suite.failed),
        "failed_analyses": dict(suite.failed_analyses),
        "runs": {
            run.label: {
                **run.summary,
                "experiment": run.key.experiment,
                "group": run.key.group,
                "x": run.x,
                "seed": run.seed,
                "config": run.table,
            }
            for run in finished
        },
        "run_seconds_total": run_seconds,
        "reused_runs": len(reused),
    }
    write_json_atomic(out / "summary.json", summary)
    wall_text = f"{wall_time_s:.1f} s" + (
        f" in this call, which reused {len(reused)} runs finished by an earlier one (--resume); every run's training "
        f"and evaluation together took {run_seconds:.1f} s"
        if reused
        else ""
    )
    threads = f"torch {host['torch']} ({host['torch_threads']} threads)"
    load = host["loadavg_at_end"][0]
    described = f"{host['platform']}, {host['cpu_count']} CPUs, {threads}, load average at end {load:.2f}"
    meta = [
        ("command", command),
        ("data", suite.dataset.description),
        ("seeds", str(suite.seeds)),
        ("mode", "quick" if suite.quick else "full"),
        ("runs", str(len(suite.runs))),
        ("wall time", wall_text),
        ("machine", described),
        (
            "raw data",
            "metrics.csv (every evaluated round of every run), summary.json (summaries, configs, fits, claims)",
        ),
    ]
    sections = [Section("Claims held against the data", [claims_paragraph(suite)], [claim_table(suite.claims)])]
    sections += suite.sections
    if suite.failed:
        sections.append(Section("Failed runs", [f"{label}: {err}" for label, err in suite.failed]))
    write_report(Report(f"distdpo reproduce — {suite.dataset.name}", meta, sections), out)
    return out


def format_claims(summary: dict) -> str:
    """The claim table of a ``summary.json`` as aligned plain text."""
    lines = []
    for c in summary["claims"]:
        lines.append(
            f"[{c['experiment']:<3}] {c['verdict']:<34} {c['claim']}\n"
            f"      predicted: {c['predicted']}; measured: {c['measured']} ({c['regime']})"
        )
    return "\n".join(lines)
