"""Nothing stale is returned as new: checkpoints, resumed run directories and cached reference log-probs are tied
to the data and the model they were computed from."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import HHH, need

from distdpo.cli import main
from distdpo.lm.builtin import build_model, train_tokenizer
from distdpo.lm.logprobs import tokenize_pairs
from distdpo.lm.policy import CausalLMPolicy
from distdpo.tasks.text import TextTask


def _hhh_file(tmp_path, swap=False, n=40):
    records = [json.loads(line) for line in need(HHH).read_text().splitlines()[:n]]
    if swap:
        records = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in records]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _config(tmp_path, data, **engine):
    lines = [
        f'[data]\nsource = "{data}"\nformat = "trl"\nnum_clients = 2\neval_fraction = 0.2\nloss_pairs_per_client = 2',
        '[policy]\nkind = "causal_lm"\nmodel = "builtin:gpt2-tiny"\nmax_length = 48\nlora_r = 2\n'
        "tokenizer_vocab_size = 300",
        "[algorithm]\nrounds = 2\nlocal_steps = 1\nbatch_size = 2\nlr = 0.5",
        "[engine]\nprogress = false\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in engine.items()),
    ]
    path = tmp_path / "cfg.toml"
    path.write_text("\n".join(lines))
    return path


def test_a_checkpoint_of_other_data_is_refused(tmp_path, capsys):
    data = _hhh_file(tmp_path)
    cfg = _config(tmp_path, data, checkpoint_every=1, checkpoint_dir=str(tmp_path / "ckpt"))
    assert main(["run", str(cfg), "--out", str(tmp_path / "a")]) == 0
    _hhh_file(tmp_path, swap=True)  # every pair's chosen and rejected swapped, same file name
    assert main(["run", str(cfg), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "the data" in err and "changed since checkpoint" in err
    assert not (tmp_path / "b" / "summary.json").exists()


def test_resume_of_a_run_directory_with_other_data_is_refused(tmp_path, capsys):
    data = _hhh_file(tmp_path)
    cfg = _config(tmp_path, data)
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out)]) == 0
    summary = (out / "summary.json").read_bytes()
    assert main(["run", str(cfg), "--out", str(out), "--resume"]) == 0  # same data: nothing to redo, accepted
    _hhh_file(tmp_path, swap=True)
    assert main(["run", str(cfg), "--out", str(out), "--resume"]) == 2
    assert "the data" in capsys.readouterr().err
    assert (out / "summary.json").read_bytes() == summary


@pytest.fixture(scope="module")
def tiny_pairs():
    records = [json.loads(line) for line in need(HHH).read_text().splitlines()[:12]]
    P, C, R = ([r[k] for r in records] for k in ("prompt", "chosen", "rejected"))
    tok = train_tokenizer(P + C + R, vocab_size=300)
    return tok, tokenize_pairs(tok, P, C, R, max_length=48)


def _policy_with_config(tok, nudge: float = 0.0, **changes):
    model = build_model("builtin:gpt2-tiny", len(tok), seed=0)
    with torch.no_grad():
        next(model.parameters())[0, 0] += nudge  # one weight moved a little (the fingerprint is taken at build)
    if changes:
        config = model.config.__class__.from_dict({**model.config.to_dict(), **changes})
        other = model.__class__(config)
        other.load_state_dict(model.state_dict())  # the same weights, another architecture setting
        model = other
    return CausalLMPolicy(model, tok, lora_r=2)


def test_reference_cache_is_keyed_by_weights_and_config(tiny_pairs, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTDPO_CACHE", str(tmp_path / "cache"))
    tok, pairs = tiny_pairs
    train, held = [torch.arange(0, 5), torch.arange(5, 10)], [torch.arange(10, 11), torch.arange(11, 12)]

    def task(policy):
        return TextTask(policy, pairs, train, held, ["a", "b"], beta=0.1, loss_pairs_per_client=2)

    first = task(_policy_with_config(tok))
    assert first.precompute_reference().startswith("computed")
    assert task(_policy_with_config(tok)).precompute_reference().startswith("loaded")
    for change in ({"activation_function": "relu"}, {"layer_norm_epsilon": 1e-2}):
        other = task(_policy_with_config(tok, **change))
        assert other.policy.fingerprint() != first.policy.fingerprint()
        assert other.precompute_reference().startswith("computed")
        m = other.evaluate(
            other.initial_params(), torch.full((other.num_clients,), 1 / other.num_clients)
        )  # at the start the policy is its own reference
        assert m["logratio_chosen"] == pytest.approx(0.0, abs=1e-5)
    weights_changed = _policy_with_config(tok, nudge=1e-3)
    assert weights_changed.fingerprint() != first.policy.fingerprint()
