"""Causal-LM DPO: packed log-probs against an explicit per-token loop, padding, LoRA, the loss at init."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from distdpo.lm.builtin import build_model, train_tokenizer
from distdpo.lm.logprobs import pack, pair_logps, sequence_logp_loop, tokenize_pairs
from distdpo.lm.policy import CausalLMPolicy
from distdpo.losses import dpo_loss
from distdpo.tasks.base import Batch
from distdpo.tasks.text import TextTask

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def hhh_texts(n=24):
    path = SHARED / "hhh-alignment" / "hhh.jsonl"
    if not path.exists():
        pytest.skip(f"shared data not found at {path}")
    recs = [json.loads(line) for line in path.read_text().splitlines()[:n]]
    return [r["prompt"] for r in recs], [r["chosen"] for r in recs], [r["rejected"] for r in recs]


@pytest.fixture(scope="module")
def lm():
    P, C, R = hhh_texts()
    tok = train_tokenizer(P + C + R, vocab_size=512)
    model = build_model("builtin:gpt2-tiny", len(tok), seed=0).eval()
    pairs = tokenize_pairs(tok, P, C, R, max_length=96)
    return tok, model, pairs


@pytest.mark.parametrize("arch", ["gpt2-tiny", "llama-tiny"])
def test_packed_logps_equal_an_explicit_token_loop(lm, arch):
    tok, model, pairs = lm
    model = build_model(f"builtin:{arch}", len(tok), seed=1).eval()
    with torch.no_grad():
        w, l = pair_logps(model, pack(pairs, list(range(8)), tok.pad_token_id))
    for i in range(8):
        assert w[i].item() == pytest.approx(
            sequence_logp_loop(model, pairs.prompt[i], pairs.chosen[i]), rel=1e-5, abs=1e-4
        )
        assert l[i].item() == pytest.approx(
            sequence_logp_loop(model, pairs.prompt[i], pairs.rejected[i]), rel=1e-5, abs=1e-4
        )


def test_batching_and_padding_do_not_change_logps(lm):
    tok, model, pairs = lm
    with torch.no_grad():
        alone = [pair_logps(model, pack(pairs, [i], tok.pad_token_id)) for i in range(6)]
        batched = pair_logps(model, pack(pairs, [5, 3, 0, 1, 4, 2], tok.pad_token_id))
    for k, i in enumerate([5, 3, 0, 1, 4, 2]):
        assert batched[0][k].item() == pytest.approx(alone[i][0].item(), abs=1e-4)
        assert batched[1][k].item() == pytest.approx(alone[i][1].item(), abs=1e-4)


def test_truncation_keeps_prompt_end_and_counts():
    tok = train_tokenizer(["hello world " * 50, "yes no"], vocab_size=300)
    pairs = tokenize_pairs(tok, ["hello world " * 50], ["yes " * 40], ["no"], max_length=32)
    assert len(pairs.prompt[0]) + len(pairs.chosen[0]) <= 32 and len(pairs.prompt[0]) + len(pairs.rejected[0]) <= 32
    full = tok("hello world " * 50, add_special_tokens=False)["input_ids"]
    assert pairs.prompt[0].tolist() == full[-len(pairs.prompt[0]) :]  # the end of the prompt is kept
    assert pairs.stats["truncated_prompts"] == 1 and pairs.stats["truncated_completions"] == 1
    assert pairs.chosen[0][-1].item() != tok.eos_token_id  # cut completion: its EOS went with the cut
    assert pairs.rejected[0][-1].item() == tok.eos_token_id


def make_task(lm, lora_r=4):
    tok, model, pairs = lm
    policy = CausalLMPolicy(build_model("builtin:gpt2-tiny", len(tok), seed=0), tok, lora_r=lora_r, lora_alpha=8)
    train = [np.arange(0, 8), np.arange(8, 16)]
    held = [np.arange(16, 20), np.arange(20, 24)]
    return TextTask(policy, pairs, train, held, ["a", "b"], beta=0.1, loss_pairs_per_client=4)


def test_dpo_loss_on_a_real_batch_equals_per_example_computation(lm):
    task = make_task(lm)
    tok, model, pairs = lm
    theta = task.initial_params() + 0.05 * torch.randn(task.num_params, generator=torch.Generator().manual_seed(0))
    batch = Batch(torch.tensor([[0, 3, 5], [1, 2, 7]]), torch.full((2, 3), 1 / 3, dtype=torch.float64))
    loss, _ = task.loss_and_grad(theta.expand(2, -1), torch.tensor([0, 1]), batch)
    task.policy.set_flat(theta)
    merged = task.policy.model  # policy with this adapter
    for node, ids in ((0, [0, 3, 5]), (1, [9, 10, 15])):
        pw = torch.tensor([sequence_logp_loop(merged, pairs.prompt[i], pairs.chosen[i]) for i in ids])
        pl = torch.tensor([sequence_logp_loop(merged, pairs.prompt[i], pairs.rejected[i]) for i in ids])
        rw = torch.tensor([sequence_logp_loop(model, pairs.prompt[i], pairs.chosen[i]) for i in ids])
        rl = torch.tensor([sequence_logp_loop(model, pairs.prompt[i], pairs.rejected[i]) for i in ids])
        expected, m = dpo_loss(pw, pl, rw, rl, beta=0.1)
        assert loss[node].item() == pytest.approx(expected.mean().item(), rel=1e-4)
        assert m["rewards/margins"].abs().sum() > 0  # the adapter moved the policy off the reference


def _token_logps(model, prompt, completion) -> torch.Tensor:
    """Each completion token's log-prob from one plain forward of prompt + completion (float64)."""
    ids = torch.cat([prompt, completion])[None]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    steps = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(completion))
    return torch.log_softmax(logits[steps], -1).gather(1, completion[:, None]).squeeze(1)


def test_ipo_on_sequences_uses_per_token_mean_log_probs(lm):
    """TRL's IPO: the squared margin of length-normalised log-ratios, not of token-summed ones."""
    tok, model, pairs = lm
    policy = CausalLMPolicy(build_model("builtin:gpt2-tiny", len(tok), seed=0), tok, lora_r=4, lora_alpha=8)
    train, held = [np.arange(0, 8), np.arange(8, 16)], [np.arange(16, 20), np.arange(20, 24)]
    beta = 0.1
    task = TextTask(policy, pairs, train, held, ["a", "b"], beta=beta, loss_type="ipo", loss_pairs_per_client=4)
    theta = task.initial_params() + 0.05 * torch.randn(task.num_params, generator=torch.Generator().manual_seed(0))
    batch = Batch(torch.tensor([[0, 3, 5], [1, 2, 7]]), torch.full((2, 3), 1 / 3, dtype=torch.float64))
    loss, _ = task.loss_and_grad(theta.expand(2, -1), torch.tensor([0, 1]), batch)
    task.policy.set_flat(theta)
    for node, ids in ((0, [0, 3, 5]), (1, [9, 10, 15])):
        per_pair = []
        for i in ids:
            mean = lambda m, c: _token_logps(m, pairs.prompt[i], c).mean()  # noqa: E731
            h = (mean(task.policy.model, pairs.chosen[i]) - mean(model, pairs.chosen[i])) - (
                mean(task.policy.model, pairs.rejected[i]) - mean(model, pairs.rejected[i])
            )
            per_pair.append((h - 1 / (2 * beta)) ** 2)
        assert loss[node].item() == pytest.approx(float(torch.stack(per_pair).mean()), rel=1e-4)
    # the held-out implicit rewards use the same per-token log-ratios
    m = task.evaluate(theta, torch.tensor([0.5, 0.5], dtype=torch.float64))
    rewards = []
    for i in held[0].tolist() + held[1].tolist():
        rewards.append(
            beta
            * (
                _token_logps(task.policy.model, pairs.prompt[i], pairs.chosen[i]).mean()
                - _token_logps(model, pairs.prompt[i], pairs.chosen[i]).mean()
            )
        )
    assert m["rewards/chosen"] == pytest.approx(float(torch.stack(rewards).mean()), rel=1e-3, abs=1e-6)


def test_loss_at_initialization_is_ln2_and_lora_changes_only_the_adapter(lm):
    task = make_task(lm)
    w = torch.tensor([0.5, 0.5], dtype=torch.float64)
    m = task.evaluate(task.initial_params(), w)
    assert m["global_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert m["reward_margin"] == pytest.approx(0.0, abs=1e-6) and m["pref_accuracy"] == 0.0  # ties are not wins
    base_before = {k: v.clone() for k, v in task.policy.model.get_base_model().state_dict().items() if "lora_" not in k}
    _, g = task.loss_and_grad(
        task.initial_params()[None], torch.tensor([0]), task.sample_batch(torch.Generator().manual_seed(0), 4)
    )
    task.policy.set_flat(task.initial_params() - 10.0 * g[0])
    after = task.policy.model.get_base_model().state_dict()
    assert all(torch.equal(v, after[k]) for k, v in base_before.items())  # base weights untouched
    tok, model, pairs = lm
    batch = pack(pairs, [0, 1, 2], tok.pad_token_id)
    ref_w, _ = task.policy.reference_logps(batch)
    with torch.no_grad():
        base_w, _ = pair_logps(model, batch)
        pol_w, _ = task.policy.logps(batch)
    assert torch.allclose(ref_w, base_w, atol=1e-4)  # adapter disabled = the base model
    assert not torch.allclose(pol_w, base_w, atol=1e-3)  # adapter enabled = a different policy
    assert task.num_params < sum(p.numel() for p in model.parameters()) / 5


def test_gradient_matches_finite_difference_on_the_adapter(lm):
    task = make_task(lm)
    theta = task.initial_params().double() + 0.1 * torch.randn(
        task.num_params, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    batch = Batch(torch.tensor([[0, 1], [0, 1]]), torch.full((2, 2), 0.5, dtype=torch.float64))
    nodes = torch.tensor([0])
    _, g = task.loss_and_grad(theta.float()[None], nodes, batch)
    direction = g[0].double() / g[0].norm()
    eps = 1e-2
    up, _ = task.loss_and_grad((theta + eps * direction).float()[None], nodes, batch)
    down, _ = task.loss_and_grad((theta - eps * direction).float()[None], nodes, batch)
    fd = (up - down).item() / (2 * eps)
    assert fd == pytest.approx(g[0].norm().item(), rel=2e-2)


def test_text_config_runs_end_to_end(tmp_path):
    from distdpo.cli import main

    path = SHARED / "pandalm" / "testset-v1.json"
    if not path.exists():
        pytest.skip(f"shared data not found at {path}")
    cfg = tmp_path / "pandalm.toml"
    cfg.write_text(f"""
[data]
source = "{path}"
format = "pandalm"
partition = "natural"
label_column = "annotator"
max_pairs = 60
eval_fraction = 0.2
loss_pairs_per_client = 2
[policy]
kind = "causal_lm"
model = "builtin:llama-tiny"
max_length = 64
lora_r = 2
tokenizer_vocab_size = 300
[algorithm]
name = "gradient_tracking"
rounds = 2
local_steps = 1
batch_size = 2
lr = 0.5
[engine]
progress = false
""")
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    run = summary["runs"]["run"]
    assert run["num_clients"] == 3 and run["f_star"] is None
    stats = run["data_stats"]
    assert stats["dropped_ties"] > 0 and "truncated_prompts" in stats
    # the loader's count keeps its name; tokenization's has its own
    assert stats["pairs"] > stats["tokenized_pairs"] == 60 and "exact_duplicates" in stats  # data.max_pairs = 60
    assert "human preference data" in summary["data"]
    header = (out / "metrics.csv").read_text().splitlines()[0]
    for col in ("pref_accuracy_worst", "tokens_per_second", "client_loss/annotator1", "bytes_communicated"):
        assert col in header
    # 2 rounds × 6 directed messages (a ring of 3) × 2 vectors (GT: parameters and tracker) × p float32
    assert run["final"]["bytes_communicated"] == 2 * 6 * 2 * run["num_params"] * 4


def test_full_gradient_and_its_curvature_match_differences_of_the_loss(lm):
    """∇f and the finite-difference power iteration's eigenvalue, each against central differences of f alone."""
    from distdpo import theory

    task = make_task(lm)
    w = torch.tensor([0.3, 0.7], dtype=torch.float64)
    theta = task.initial_params().double() + 0.1 * torch.randn(
        task.num_params, generator=torch.Generator().manual_seed(2), dtype=torch.float64
    )
    f = lambda t: task.evaluate(t.float(), w)["global_loss"]  # noqa: E731
    g = task.full_gradient(theta.float(), w)
    u = g / g.norm()
    eps = 1e-2
    assert (f(theta + eps * u) - f(theta - eps * u)) / (2 * eps) == pytest.approx(float(g.norm()), rel=2e-2)
    lam, v = theory.hessian_top_eigenpair_fd(lambda t: task.full_gradient(t.float(), w), theta, iters=30, tol=1e-4)
    h = 0.05  # the curvature along that eigenvector from three losses, no gradients
    curvature = (f(theta + h * v) - 2 * f(theta) + f(theta - h * v)) / h**2
    assert abs(lam) > 0 and curvature == pytest.approx(lam, rel=5e-2)


def test_adapter_initialisation_is_seeded(lm):
    """Same seed, same adapter in any process state; another seed, another adapter (peft draws from the global RNG)."""
    tok, model, pairs = lm
    make = lambda seed: CausalLMPolicy(
        build_model("builtin:gpt2-tiny", len(tok), seed=0), tok, lora_r=4, seed=seed
    ).get_flat()  # noqa: E731
    first = make(1)
    torch.rand(7)  # move the global RNG
    assert torch.equal(make(1), first) and not torch.equal(make(2), first)
