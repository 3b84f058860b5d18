"""``distdpo eval`` on a saved model of every decoder-only architecture gives the log-probs of a plain
``model(input_ids).logits`` forward; a user's mistake ends in one line and exit code 2."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from test_logprobs_architectures import ARCHS, build, plain_logp

from distdpo.cli import main
from distdpo.lm.builtin import train_tokenizer

PAIRS = [
    {"prompt": "The sky is", "chosen": " blue today.", "rejected": " made of cheese and stars."},
    {"prompt": "Two plus two", "chosen": " is four.", "rejected": " is five."},
    {"prompt": "Say hi:", "chosen": " hi", "rejected": " no thanks, I would rather not."},
]


@pytest.fixture(scope="module")
def tokenizer():
    texts = [r[k] for r in PAIRS for k in ("prompt", "chosen", "rejected")] * 4
    return train_tokenizer(texts, vocab_size=300)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    return path


def token_ids(tokenizer, text: str, eos: bool) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if eos else [])
    return torch.tensor(ids)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_eval_gives_the_log_probs_of_a_plain_forward(arch, tokenizer, data, tmp_path):
    model = build(arch, vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    out = tmp_path / "scores.jsonl"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a model scored one sequence at a time says it is slow
        assert main(["eval", "--model", str(tmp_path / "model"), "--data", str(data), "--out", str(out)]) == 0
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in scored] == [0, 1, 2] and "ref_chosen_logps" not in scored[0]
    for record, pair in zip(scored, PAIRS):
        prompt = token_ids(tokenizer, pair["prompt"], eos=False)
        for side in ("chosen", "rejected"):
            expected = plain_logp(model, prompt, token_ids(tokenizer, pair[side], eos=True))
            assert record[f"{side}_logps"] == pytest.approx(expected, abs=1e-3)
    summary = json.loads((tmp_path / "scores.summary.json").read_text())
    margins = [r["chosen_logps"] - r["rejected_logps"] for r in scored]
    assert summary["score"] == "log_likelihood_ratio" and summary["pairs"] == 3
    assert summary["accuracy"] == pytest.approx(sum(m > 0 for m in margins) / 3)
    assert summary["mean_margin"] == pytest.approx(sum(margins) / 3)


def test_eval_with_an_adapter_scores_the_reference_with_it_disabled(tokenizer, data, tmp_path):
    peft = pytest.importorskip("peft")
    base = build("llama", vocab_size=len(tokenizer))
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    adapted = peft.get_peft_model(build("llama", vocab_size=len(tokenizer)), peft.LoraConfig(r=2, lora_alpha=4))
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    adapted.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "scores.jsonl"
    args = ["eval", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--data", str(data)]
    assert main([*args, "--beta", "0.2", "--out", str(out)]) == 0
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    for record, pair in zip(scored, PAIRS):
        prompt = token_ids(tokenizer, pair["prompt"], eos=False)
        completions = [token_ids(tokenizer, pair[side], eos=True) for side in ("chosen", "rejected")]
        policy = [plain_logp(adapted.eval(), prompt, c) for c in completions]
        reference = [plain_logp(base, prompt, c) for c in completions]
        assert [record["chosen_logps"], record["rejected_logps"]] == pytest.approx(policy, abs=1e-3)
        assert [record["ref_chosen_logps"], record["ref_rejected_logps"]] == pytest.approx(reference, abs=1e-3)
        margin = 0.2 * ((policy[0] - reference[0]) - (policy[1] - reference[1]))
        assert record["margin"] == pytest.approx(margin, abs=1e-3)
    summary = json.loads((tmp_path / "scores.summary.json").read_text())
    assert (summary["score"], summary["beta"]) == ("implicit_reward", 0.2)
    assert main([*args, "--out", str(out)]) == 0  # its own earlier output is replaced
    # An export trained against a separate reference model: scoring against the adapter switched off is refused.
    info = {"config": {"policy": {"reference_model": "some/reference"}}}
    (tmp_path / "adapter" / "distdpo.json").write_text(json.dumps(info))
    assert main([*args, "--out", str(out)]) == 2


@pytest.fixture()
def model_dir(tokenizer, tmp_path):
    build("gpt2", vocab_size=len(tokenizer)).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "{tmp}/nowhere"], "no such file or directory"),
        (["--model", "{tmp}/notamodel"], "cannot load a causal LM from that directory"),
        (["--data", "{tmp}/missing.jsonl"], "no such file"),
        (["--data", "{tmp}/notes.txt"], "unsupported file type"),
        (["--format", "pandalm"], "missing field 'instruction'"),
        (["--adapter", "{tmp}/notamodel"], "no adapter_config.json there"),
        (["--max-length", "3"], "--max-length"),
        (["--out", "{tmp}/notes.txt"], "was not written by distdpo eval"),
    ],
)
def test_mistakes_end_in_one_line_and_exit_code_2(args, message, model_dir, data, tmp_path, capsys):
    (tmp_path / "notamodel").mkdir()
    (tmp_path / "notamodel" / "readme.md").write_text("hello")
    (tmp_path / "notes.txt").write_text("mine")
    given = dict(zip(args[::2], [a.format(tmp=tmp_path) for a in args[1::2]]))
    argv = ["eval", "--model", str(model_dir), "--data", str(data)]
    for flag, value in given.items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.startswith("error:")
    assert (tmp_path / "notes.txt").read_text() == "mine"
