"""The log-linear policy on text features: deterministic, blind to the held-out split, exact f★, FedAvg = GD,
LM features = a plain forward's pooled hidden states, the personalization gap, and clear config errors."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import scipy.optimize
import torch

from distdpo import build
from distdpo.cli import main
from distdpo.config import ConfigError, from_dict
from distdpo.data.split import split_text_data
from distdpo.data.text_features import pair_features
from distdpo.experiment import run_one
from distdpo.personalization import own_optima, personalization_gap, separable
from distdpo.solver import solve_centralized

WORDS = "kind clear rude wrong helpful safe vague polite harmful exact brief long sorry sure maybe never".split()
GOOD = {"kind", "clear", "helpful", "safe", "polite", "exact"}


def write_pairs(path, n=90, seed=0, edit=None):
    """A TRL file of ``n`` pairs over 30 prompts; chosen has more 'good' words, with 25% of the labels flipped."""
    rng = random.Random(seed)
    records = []
    for k in range(n):
        a, b = (" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(2))
        score = lambda text: sum(w in GOOD for w in text.split())  # noqa: E731
        if (score(a) < score(b)) ^ (rng.random() < 0.25):
            a, b = b, a
        records.append({"prompt": f"question {k % 30}: is it {rng.choice(WORDS)}?", "chosen": a, "rejected": b})
    for k, record in (edit or {}).items():
        records[k] = {**records[k], **record}
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def config(source, **policy):
    return from_dict(
        {
            "data": {"source": str(source), "num_clients": 3, "eval_fraction": 0.2},
            "policy": {"kind": "loglinear", "feature_dim": 16, **policy},
            "algorithm": {"rounds": 4, "local_steps": 1, "batch_size": "full", "lr": 2.0},
            "engine": {"dtype": "float64", "progress": False},
        }
    )


def test_hashed_features_are_deterministic_and_do_not_read_the_held_out_split(tmp_path):
    cfg = config(write_pairs(tmp_path / "a.jsonl"))
    first, again = build.build_task(cfg), build.build_task(cfg)
    assert torch.equal(first._pairs64, again._pairs64) and torch.equal(
        first.data.eval_features, again.data.eval_features
    )
    held_out = np.concatenate(split_text_data(cfg).eval).tolist()
    assert held_out  # the test needs held-out pairs to change
    edit = {k: {"chosen": f"completely new words {k} zebra", "rejected": f"other unseen text {k}"} for k in held_out}
    changed = build.build_task(config(write_pairs(tmp_path / "b.jsonl", edit=edit)))
    assert torch.equal(changed._pairs64, first._pairs64)  # IDF from training pairs only: training φ unchanged
    assert not torch.equal(changed.data.eval_features, first.data.eval_features)
    norms = first.data.features[first._weight64 > 0].norm(dim=-1)
    assert torch.allclose(norms[norms > 0], torch.ones(1, dtype=torch.float64))  # TF-IDF rows are L2-normalised


def test_f_star_of_text_features_agrees_with_scipy_on_the_pooled_problem(tmp_path):
    cfg = config(write_pairs(tmp_path / "a.jsonl"), beta=0.7)
    task = build.build_task(cfg)
    sol = solve_centralized(task, build.client_weights(cfg, task.client_sizes))
    split = split_text_data(cfg)  # the same pairs, featurized here without the task
    train = np.concatenate(split.train)
    phi_w, phi_l = pair_features("hashed", split.data.prompt, split.data.chosen, split.data.rejected, train, 16)
    z, beta = (phi_w - phi_l)[train], 0.7

    def f(theta):  # the pooled DPO loss against a uniform reference: mean softplus(−β zᵀθ)
        h = beta * (z @ theta)
        return np.logaddexp(0, -h).mean(), (-(beta / (1 + np.exp(h)))[:, None] * z).mean(0)

    res = scipy.optimize.minimize(f, np.zeros(16), jac=True, method="BFGS", options={"gtol": 1e-12, "maxiter": 10000})
    assert sol.converged
    assert sol.f_star == pytest.approx(res.fun, abs=1e-10)
    np.testing.assert_allclose(sol.theta.numpy(), res.x, atol=1e-5)


def test_fedavg_with_one_local_step_and_full_batch_is_gradient_descent_on_text_features(tmp_path):
    cfg = config(write_pairs(tmp_path / "a.jsonl"))
    rows, _ = run_one(cfg, "fedavg", progress=False)
    task = build.build_task(cfg)
    z = task._pairs64[task._weight64 > 0].numpy()  # every training pair's φ_w − φ_l
    theta = np.zeros(z.shape[1])
    for r in range(4):
        h = z @ theta
        theta = theta - 2.0 * (-(1 / (1 + np.exp(h)))[:, None] * z).mean(0)
        assert rows[r + 1]["global_loss"] == pytest.approx(float(np.logaddexp(0, -(z @ theta)).mean()), abs=1e-12)


def test_lm_features_equal_a_plain_forward_and_are_cached(tmp_path, monkeypatch):
    from distdpo.lm import features
    from distdpo.lm.features import pooled_hidden_states, random_projection, token_ids
    from distdpo.lm.policy import load_model_and_tokenizer

    monkeypatch.setenv("DISTDPO_CACHE", str(tmp_path / "cache"))
    source = write_pairs(tmp_path / "a.jsonl", n=24)
    lm = {"model": "builtin:gpt2-tiny", "max_length": 24, "tokenizer_vocab_size": 300}
    cfg = config(source, features="lm", **lm)
    task = build.build_task(cfg)
    assert len(list((tmp_path / "cache" / "lm_features").iterdir())) == 1
    split = split_text_data(cfg)
    data, train = split.data, np.concatenate(split.train)
    texts = [data.prompt[i] + r for i in train.tolist() for r in (data.chosen[i], data.rejected[i])]
    model, tokenizer = load_model_and_tokenizer("builtin:gpt2-tiny", training_texts=texts, vocab_size=300, seed=0)
    model.eval()  # no dropout
    sequences = [p + c for p, c in zip(data.prompt, data.chosen)] + [p + r for p, r in zip(data.prompt, data.rejected)]
    ids = token_ids(tokenizer, sequences, 24)
    first = int(split.train[0][0])  # client 0's first training pair
    rows = [first, len(data.prompt) + first, 0, 1, len(ids) - 1]  # its chosen and rejected sequences, and others
    with torch.no_grad():
        plain = torch.stack(
            [model(torch.tensor([ids[k]]), output_hidden_states=True).hidden_states[-1][0].mean(0) for k in rows]
        ).double()
    pooled = pooled_hidden_states(model, ids, tokenizer.pad_token_id)  # right-padded batches
    torch.testing.assert_close(pooled[rows], plain, atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(features, "pooled_hidden_states", None)  # a second call must read the cache
    torch.testing.assert_close(features.cached_pooled_states(model, ids, tokenizer.pad_token_id), pooled)
    projected = plain[:2] @ random_projection(plain.shape[1], 16, seed=0)
    torch.testing.assert_close(task.data.features[0, 0], projected, atol=1e-5, rtol=1e-5)


def test_personalization_gap_compares_each_clients_own_optimum(tmp_path):
    cfg = config(write_pairs(tmp_path / "a.jsonl", n=150), feature_dim=8)
    task = build.build_task(cfg)
    _, summary = run_one(cfg, "fedavg", progress=False)
    gap = summary["personalization_gap"]
    one = torch.ones(1, dtype=torch.float64)
    optima = own_optima(task)
    assert all(theta is not None for theta in optima)  # 40 pairs a client, 8 features: not separable
    own = torch.stack([solve_centralized(task.client(i), one).theta for i in range(3)])
    shared = summary["final"]["pref_accuracy"]
    assert gap["clients"] == 3 and gap["shared_accuracy"] == pytest.approx(shared)
    assert gap["own_accuracy"] == pytest.approx(float(task.held_out_accuracies(own).mean()))
    assert gap["mean"] == pytest.approx(gap["own_accuracy"] - shared)
    assert gap["worst"] == max(gap["per_client"].values()) and gap["worst_client"] in task.client_names


def test_separable_pairs_have_no_own_optimum():
    z = torch.tensor([[1.0, 0.0], [2.0, 1.0], [0.5, -0.2]], dtype=torch.float64)  # θ = (1, 0) orders them all
    assert separable(z)
    assert not separable(torch.cat([z, -z[:1]]))  # a pair and its reverse: no direction raises both


def test_synthetic_runs_report_the_personalization_gap():
    from helpers import make_config

    cfg = make_config(algorithm={"rounds": 3})
    task = build.build_task(cfg)
    gap = personalization_gap(task, task.initial_params())
    assert gap["clients"] == 8 and gap["mean"] > 0  # the reference policy is no user's optimum


@pytest.mark.parametrize(
    "policy,needle",
    [
        ({"kind": "causal_lm", "features": "hashed"}, "policy.features = 'hashed' applies to the log-linear"),
        ({"feature_dim": 0}, "policy.feature_dim must be positive"),
        ({"kind": "mlp"}, "policy.kind = 'mlp' does not fit"),
        ({"features": "bag"}, "policy.features must be one of"),
    ],
)
def test_bad_text_feature_configs_are_refused(tmp_path, capsys, policy, needle):
    source = write_pairs(tmp_path / "a.jsonl", n=20)
    lines = [f'[data]\nsource = "{source}"\nnum_clients = 2', "[policy]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in {"kind": "loglinear", **policy}.items()]
    (tmp_path / "c.toml").write_text("\n".join(lines) + "\n[engine]\nprogress = false\n")
    assert main(["run", str(tmp_path / "c.toml"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err


def test_features_on_the_synthetic_model_are_refused():
    with pytest.raises(ConfigError, match="the synthetic model has its own"):
        from_dict({"policy": {"features": "hashed"}})


def test_features_suites_plan_every_experiment_on_real_data_with_exact_gradients():
    from distdpo.reproduce import DATASETS
    from distdpo.reproduce.experiments import EXPERIMENTS
    from distdpo.reproduce.runs import Plan

    for name in ("hh-rlhf-features", "pandalm-features"):
        dataset = DATASETS[name]
        assert dataset.log_linear and dataset.scale(False).exact_gradients and dataset.scale(False).gt_rounds
        assert set(dataset.experiments) == {"A", "B1", "B2", "B3", "B4", "B5", "P"}
        plan = Plan(dataset, quick=False, seeds=1)
        runs = [
            run for experiment in EXPERIMENTS if experiment.NAME in dataset.experiments for run in experiment.runs(plan)
        ]
        for run in runs:
            cfg = from_dict(run.table)  # every run's config is valid
            assert cfg.policy.kind == "loglinear" and cfg.data.source.endswith((".json", ".jsonl.gz"))
        skews = {run.table["data"]["dirichlet_alpha"] for run in runs if run.key.experiment == "B5"}
        assert skews == {1 / level for level in dataset.scale(False).heterogeneity}
        assert {run.table["data"]["partition"] for run in runs if run.key.experiment == "B5n"} == {"iid"}


@pytest.mark.slow
def test_quick_features_suite_tests_every_claim(tmp_path):
    from helpers import PANDALM, need

    need(PANDALM)
    out = tmp_path / "suite"
    main(["reproduce", "--dataset", "pandalm-features", "--quick", "--seeds", "1", "--out", str(out), "--no-progress"])
    summary = json.loads((out / "summary.json").read_text())
    verdicts = [claim["verdict"] for claim in summary["claims"]]
    assert verdicts and not [v for v in verdicts if v.startswith("not testable")]
    assert any(claim["experiment"] == "P" for claim in summary["claims"])
    assert all("personalization_gap" in run for run in summary["runs"].values())
