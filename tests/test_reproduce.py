"""``distdpo reproduce``: the directions of the paper's claims on small instances, the fits, and the report files."""

import base64
import csv
import itertools
import json
import math
import re

import numpy as np
import pytest
import torch
from helpers import make_config

from distdpo.cli import main
from distdpo.config import ConfigError
from distdpo.experiment import Cache, run_one
from distdpo.reproduce import DATASETS, MissingRuns, RunKey, Verdict, dataset_base, fit_loglog, verdict
from distdpo.reproduce.experiments import b4_staleness


@pytest.fixture(autouse=True)
def _one_thread(_threads):
    """Small sequential runs: one intra-op thread (what ``reproduce`` uses; extra threads stall on a shared machine)."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(2)


SMALL = {"num_clients": 8, "pairs_per_client": 60, "eval_pairs_per_client": 20, "dim": 6, "num_actions": 4}


def _floor(rows, column="optimality_gap", frac=0.1):
    ys = [r[column] for r in rows[1:]]
    k = max(1, int(len(ys) * frac))
    return float(np.mean(ys[-k:]))


def _run(cache, heterogeneity=2.0, graph="ring", **algorithm):
    cfg = make_config(
        data={**SMALL, "heterogeneity": heterogeneity},
        algorithm={"rounds": 150, "lr": 0.5, "batch_size": "full", **algorithm},
        topology={"graph": graph},
        engine={"progress": False, "eval_every": 5},
    )
    rows, summary = run_one(cfg, "t", cache, progress=False)
    return rows, summary


@pytest.fixture(scope="module")
def cache():
    return Cache()


def test_gap_increases_with_local_steps_at_high_heterogeneity(cache):
    floors = [_floor(_run(cache, name="fedavg", local_steps=e)[0]) for e in (1, 3, 6)]
    assert floors[0] < 1e-9 < floors[1] < floors[2]


def test_gap_decreases_with_participation(cache):
    floors = [
        _floor(_run(cache, name="fedavg", local_steps=1, clients_per_round=s)[0], frac=0.5 if s < 8 else 0.1)
        for s in (1, 2, 4, 8)
    ]
    assert floors[0] > floors[1] > floors[2] > floors[3]
    assert floors[3] < 1e-9  # every client every round: gradient descent


def test_consensus_distance_decreases_with_spectral_gap(cache):
    out = []
    for g in ("path", "ring", "torus", "exponential"):
        rows, summary = _run(cache, name="dsgd", local_steps=1, graph=g)
        out.append((summary["spectral_gap"], _floor(rows, "consensus_distance")))
    out.sort()
    gaps, cons = zip(*out)
    assert gaps[0] < gaps[-1]
    assert all(a > b for a, b in itertools.pairwise(cons))


def test_gradient_tracking_beats_dsgd_at_high_heterogeneity(cache):
    dsgd = _floor(_run(cache, heterogeneity=4.0, name="dsgd", local_steps=1, graph="ring")[0])
    gt = _floor(_run(cache, heterogeneity=4.0, name="gradient_tracking", local_steps=1, graph="ring")[0])
    assert gt < 1e-3 * dsgd


def test_fit_recovers_a_known_exponent():
    rng = np.random.default_rng(0)
    x = np.repeat([1.0, 2.0, 4.0, 8.0], 3)
    y = 3.0 * x**-1.5 * np.exp(0.05 * rng.standard_normal(len(x)))
    fit = fit_loglog(x, y, -1.5)
    assert fit["lo"] < -1.5 < fit["hi"] and fit["hi"] - fit["lo"] < 0.2 and fit["r2"] > 0.99
    assert verdict(fit) == "holds"
    assert verdict(fit_loglog(x, y, -3.0)) == "direction only (exponent differs)"
    assert verdict(fit_loglog(x, y, 1.0)) == "does not hold"
    assert verdict(fit_loglog(x, rng.uniform(1, 2, len(x)), 1.0)).startswith(("inconclusive", "does not hold"))
    assert math.isnan(fit_loglog([1, 2], [1, 2], 1.0)["slope"])  # too few points: no fit, no verdict


def test_datasets_are_base_configs():
    table = dataset_base("synthetic", quick=True)
    assert set(table) >= {"data", "policy"}
    for name in ("hh-rlhf", "pandalm"):
        base = DATASETS[name].base(True)
        assert base["policy"]["kind"] == "causal_lm" and base["policy"]["model"] == "builtin:gpt2-tiny"
        assert "shared/data" in base["data"]["source"].replace("\\", "/")
    with pytest.raises(ConfigError, match="--dataset must be one of"):
        dataset_base("nope", quick=True)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    assert main(["reproduce", "--quick", "--seeds", "2", "--out", str(out), "--no-progress"]) == 0
    return out


def test_quick_writes_the_report_and_the_metrics(quick_run):
    out = quick_run
    html = (out / "report.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(images) >= 8
    assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    assert "<img" in html and 'src="figures/' not in html  # self-contained
    md = (out / "report.md").read_text()
    for name in re.findall(r"\]\((figures/[^)]+\.png)\)", md):
        assert (out / name).is_file()
    assert "| exp. | claim |" in md
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {"experiment", "group", "seed", "optimality_gap", "consensus_distance"} <= set(rows[0])
    assert {r["experiment"] for r in rows} >= {"A", "B1", "B2", "B3", "B4", "B5", "B5n"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == 2 and summary["quick"] and len(summary["runs"]) == len({r["run"] for r in rows})
    assert summary["claims"] and all(c["verdict"] for c in summary["claims"])
    th = summary["theory"]
    assert th["L_bound"] >= th["L_eig_at_theta_star"]
    assert th["L_power_at_theta_star"] == pytest.approx(th["L_eig_at_theta_star"], rel=1e-3)


def test_quick_claims_point_the_predicted_way(quick_run):
    fits = json.loads((quick_run / "summary.json").read_text())["fits"]
    assert fits["B1_drift"]["slope"] > 0  # floor grows with E
    assert fits["B2_participation"]["slope"] > 0  # floor grows with 1/S − 1/n
    assert fits["B3_consensus_vs_gap"]["slope"] < 0  # consensus distance falls with the spectral gap
    assert fits["B5_clients_full"]["slope"] < 0  # more clients, lower noise floor
    claims = {c["claim"]: c for c in json.loads((quick_run / "summary.json").read_text())["claims"]}
    assert claims["gradient tracking beats DSGD at high ζ²"]["verdict"] == "holds"


def test_resume_reruns_only_the_missing_runs_and_gives_the_same_fits(quick_run, tmp_path, capsys):
    import shutil

    out = tmp_path / "resumed"
    shutil.copytree(quick_run, out)
    # refuses to overwrite
    assert main(["reproduce", "--quick", "--seeds", "2", "--out", str(out), "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err
    (out / "runs" / "zz-notes.json").write_text('{"label": "x"}')  # a foreign file is refused by name, not trusted
    assert main(["reproduce", "--quick", "--seeds", "2", "--out", str(out), "--no-progress", "--resume"]) == 2
    assert "zz-notes.json is not a run record" in capsys.readouterr().err
    (out / "runs" / "zz-notes.json").unlink()
    records = sorted((out / "runs").glob("*.json"))
    assert len(records) == len(json.loads((quick_run / "summary.json").read_text())["runs"])
    for f in records[::2]:  # as if the process died before these finished
        f.unlink()
    (out / "summary.json").unlink()
    assert main(["reproduce", "--quick", "--seeds", "2", "--out", str(out), "--no-progress", "--resume"]) == 0
    assert len(list((out / "runs").glob("*.json"))) == len(records)
    before = json.loads((quick_run / "summary.json").read_text())
    after = json.loads((out / "summary.json").read_text())
    assert after["fits"] == before["fits"] and after["claims"] == before["claims"]
    assert after["reused_runs"] == len(records) - len(records[::2])
    assert "reused" in (out / "report.md").read_text()


def test_a_failed_analysis_is_reported_and_the_exit_code_says_so(quick_run, tmp_path, capsys, monkeypatch):
    import shutil

    out = tmp_path / "failing"
    shutil.copytree(quick_run, out)

    def broken(results):
        raise KeyError("a series the analysis looks for")

    monkeypatch.setattr(b4_staleness, "analyse", broken)
    assert main(["reproduce", "--quick", "--seeds", "2", "--out", str(out), "--no-progress", "--resume"]) == 1
    err = capsys.readouterr().err
    assert "analysis B4" in err and "a series the analysis looks for" in err
    summary = json.loads((out / "summary.json").read_text())
    assert "B4" in summary["failed_analyses"]
    assert "B4: analysis failed" in (out / "report.md").read_text()  # the report is still written, and says so


def test_a_renamed_series_fails_its_analysis_loudly(quick_run, tmp_path, capsys, monkeypatch):
    """The runs an experiment builds and the runs its analysis asks for must agree; if a series is renamed on one side
    only, the analysis fails, is listed, and the command exits 1 (no claim is silently dropped)."""
    import dataclasses
    import shutil

    out = tmp_path / "renamed"
    shutil.copytree(quick_run, out)
    built = b4_staleness.runs
    exact = b4_staleness.full_batch_series(max(DATASETS["synthetic"].scale(True).staleness))

    def renamed(plan):
        runs = built(plan)
        for run in runs:
            if run.key.series == exact:
                run.key = dataclasses.replace(run.key, series="exact gradients")
        return runs

    monkeypatch.setattr(b4_staleness, "runs", renamed)
    assert main(["reproduce", "--quick", "--seeds", "2", "--out", str(out), "--no-progress", "--resume"]) == 1
    err = capsys.readouterr().err
    assert "analysis B4: MissingRuns" in err and repr(exact) in err
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["failed_analyses"]) == {"B4"} and not summary["failed_runs"]
    assert "B4/exact gradients/x=5/seed=0" in summary["runs"]  # the renamed runs were trained under their new name
    claims = json.loads((quick_run / "summary.json").read_text())["claims"]
    assert [c for c in summary["claims"] if c["experiment"] != "B4"] == [c for c in claims if c["experiment"] != "B4"]


def test_run_labels_are_derived_from_the_key():
    assert RunKey("A", "FedAvg full (S=n)", seed=1).label == "A/FedAvg full (S=n)/seed=1"
    assert RunKey("B1", "E=3", x=3.0).label == "B1/E=3/x=3/seed=0"
    assert RunKey("B3", "DSGD", regime="noise", graph="ring", seed=2).label == "B3/noise/ring/seed=2"
    assert RunKey("B5", "DSGD ring", graph="ring", x=0.5).label == "B5/DSGD ring/x=0.5/seed=0"
    assert RunKey("B5n", "FedAvg S=4", x=128.0).group == "FedAvg S=4"


def test_verdicts_serialise_as_their_text():
    assert json.dumps({"v": Verdict.DIRECTION_ONLY}) == '{"v": "direction only (exponent differs)"}'
    assert f"{Verdict.HOLDS:<8}|" == "holds   |"
    assert Verdict.of(False) == "does not hold" and not Verdict.NOT_TESTABLE_NO_OPTIMUM.testable


def test_asking_for_runs_that_do_not_exist_raises():
    from distdpo.experiment import Cache
    from distdpo.reproduce.results import Results
    from distdpo.reproduce.runs import Run

    dataset = DATASETS["synthetic"]
    finished = Run(RunKey("B4", "q_max=0", x=0.0), {}, rows=[{"round": 0}])
    results = Results(dataset, dataset.scale(True), dataset.base(True), 1, [finished], Cache())
    assert results.select("B4", "q_max=0") == [finished]
    with pytest.raises(MissingRuns, match="'q_max=0'"):  # says which series exist
        results.select("B4", "full batch q_max=5")
    with pytest.raises(MissingRuns, match="it has none"):
        results.select("B2")


def test_lora_b6_plans_every_mode_at_every_skew_and_reads_its_claims_from_the_rows(tmp_path):
    # The LM suites' B6: the plan's configs validate, and the analysis decides its claims from the runs' rows
    # (constructed here: factor averaging's round-1 error rising with the skew, freeze_a's at rounding level).
    from distdpo.config import from_dict
    from distdpo.reproduce.experiments import b6_communication, b6_lora
    from distdpo.reproduce.results import Results
    from distdpo.reproduce.runs import Plan

    dataset = DATASETS["hh-rlhf"]
    plan = Plan(dataset, quick=True, seeds=2)
    planned = b6_communication.runs(plan)
    skews = plan.scale.lora_skews
    assert len(planned) == len(skews) * len(b6_lora.MODES) * 2
    for run in planned:
        cfg = from_dict(run.table)
        assert cfg.data.dirichlet_alpha == pytest.approx(1 / run.x) and cfg.algorithm.aggregation == "uniform"
    level = {"factors": 0.1, "freeze_a": 1e-15, "product": 0.03}
    for run in planned:
        mode = run.key.series.removeprefix("LoRA ")
        growth = run.x**0.3 * (1 + 0.05 * run.seed)  # the error at round 1 grows with the skew, then decays
        run.rows = [
            {"round": t, "lora_aggregation_error": level[mode] * growth / t if t else math.nan, "global_loss": 0.69}
            for t in range(4)
        ]
    results = Results(dataset, plan.scale, plan.base, 2, planned, Cache())
    findings = b6_communication.analyse(results)
    verdicts = {claim.claim: claim.verdict for claim in findings.claims}
    assert list(verdicts.values()) == [Verdict.HOLDS] * 3, verdicts
    assert findings.fits["B6_lora_error_vs_skew"]["slope"] == pytest.approx(0.3, abs=0.05)
    for run in planned:  # factor averaging now falls with the skew: the trend claim must say so
        if run.key.series == "LoRA factors":
            for row in run.rows[1:]:
                row["lora_aggregation_error"] *= run.x**-0.6
    verdicts = [claim.verdict for claim in b6_communication.analyse(results).claims]
    assert verdicts[2] == Verdict.DOES_NOT_HOLD
