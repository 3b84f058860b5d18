"""A causal-LM run delivers its model: a PEFT adapter (and its built-in base) that plain transformers + peft load
back to the run's own held-out numbers; ``distdpo eval`` scores it; another run starts from it or uses it as its
reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from distdpo import build, faults
from distdpo.cli import main
from distdpo.config import from_dict

ALGORITHMS = ["fedavg", "dsgd"]


def write_arithmetic_pairs(path, n: int = 48) -> None:
    """Short TRL pairs, one prompt each: the right sum is chosen, a wrong one rejected."""
    lines = []
    for i in range(n):
        a, b = i % 7 + 1, i // 7 + 2
        prompt = f"Q{i}: what is {a} plus {b}?"
        lines.append(json.dumps({"prompt": prompt, "chosen": f" It is {a + b}.", "rejected": f" It is {a + b + 1}."}))
    path.write_text("\n".join(lines) + "\n")


def tiny_lm_table(data, **engine) -> dict:
    return {
        "data": {"source": str(data), "num_clients": 3, "eval_fraction": 0.25, "loss_pairs_per_client": 4},
        "policy": {
            "kind": "causal_lm",
            "model": "builtin:gpt2-tiny",
            "beta": 0.5,
            "max_length": 64,
            "lora_r": 4,
            "tokenizer_vocab_size": 300,
        },
        "algorithm": {"rounds": 3, "local_steps": 2, "lr": 2.0, "batch_size": 4},
        "engine": {"progress": False, **engine},
    }


def write_config(path, table: dict, sweep: dict | None = None) -> None:
    import tomli_w

    path.write_text(tomli_w.dumps({**table, **({"sweep": sweep} if sweep else {})}))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """FedAvg and DSGD (with node models) on the arithmetic pairs, and the split's per-client held-out files."""
    root = tmp_path_factory.mktemp("export")
    data = root / "pairs.jsonl"
    write_arithmetic_pairs(data)
    config = root / "run.toml"
    write_config(config, tiny_lm_table(data, save_node_models=True), {"algorithm": {"name": ALGORITHMS}})
    assert main(["run", str(config), "--out", str(root / "run")]) == 0
    assert main(["split", str(config), "--out", str(root / "split")]) == 0
    return root


@pytest.fixture(scope="module")
def decentralized(tmp_path_factory):
    """A short DSGD run with its node models."""
    root = tmp_path_factory.mktemp("dsgd")
    write_arithmetic_pairs(root / "pairs.jsonl", 24)
    table = tiny_lm_table(root / "pairs.jsonl", save_node_models=True)
    table["algorithm"].update(name="dsgd", rounds=2, local_steps=1)
    write_config(root / "run.toml", table)
    assert main(["run", str(root / "run.toml"), "--out", str(root / "run")]) == 0
    return root


def held_out_files(root) -> list:
    manifest = json.loads((root / "split" / "manifest.json").read_text())
    return [root / "split" / c["dir"] / "eval.jsonl" for c in manifest["clients"] if c["eval_pairs"]]


# A fresh interpreter with transformers and peft only: the export's base, adapter and tokenizer, a plain forward.
PLAIN_SCORING = textwrap.dedent(
    """
    import json, sys
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export, files = sys.argv[1], sys.argv[2:]
    tok = AutoTokenizer.from_pretrained(export)
    reference = AutoModelForCausalLM.from_pretrained(export + "/base").eval()
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(export + "/base"), export).eval()

    @torch.no_grad()
    def logp(model, prompt, completion):
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        c = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        logits = model(input_ids=torch.tensor([p + c])).logits[0].double()
        return float(torch.log_softmax(logits, -1)[len(p) - 1 : -1].gather(1, torch.tensor(c)[:, None]).sum())

    out = []
    for path in files:
        rows = [json.loads(line) for line in open(path)]
        out.append([[logp(m, r["prompt"], r[k]) for m in (policy, reference) for k in ("chosen", "rejected")]
                    for r in rows])
    print(json.dumps({"scores": out, "distdpo_imported": any(m.startswith("distdpo") for m in sys.modules)}))
    """
)


@pytest.mark.slow
def test_exported_adapter_loads_in_plain_transformers_and_peft_and_gives_the_runs_numbers(trained, tmp_path):
    summary = json.loads((trained / "run" / "summary.json").read_text())
    files = held_out_files(trained)
    beta = 0.5
    for algorithm in ALGORITHMS:
        label = f"name={algorithm}"
        export = trained / "run" / "models" / label
        assert summary["runs"][label]["model_dir"] == f"models/{label}"
        info = json.loads((export / "distdpo.json").read_text())
        assert (info["round"], info["final"], info["format"], info["base_dir"]) == (3, True, "peft_adapter", "base")
        assert info["model"] == ("average" if algorithm == "dsgd" else "global")
        assert (export / "nodes").is_dir() == (algorithm == "dsgd")  # federated: the global model only
        assert info["fingerprint"] == summary["runs"][label]["fingerprint"]
        assert info["metrics"]["pref_accuracy"] == summary["runs"][label]["final"]["pref_accuracy"]
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        proc = subprocess.run(
            [sys.executable, "-c", PLAIN_SCORING, str(export), *map(str, files)],
            capture_output=True,
            text=True,
            env={**env, "HF_HUB_OFFLINE": "1"},
            cwd=tmp_path,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        plain = json.loads(proc.stdout.splitlines()[-1])
        assert not plain["distdpo_imported"]
        accuracies = []
        for k, (path, rows) in enumerate(zip(files, plain["scores"])):
            rows = torch.tensor(rows, dtype=torch.float64)  # policy chosen, rejected; reference chosen, rejected
            margin = beta * ((rows[:, 0] - rows[:, 2]) - (rows[:, 1] - rows[:, 3]))
            accuracies.append(float((margin > 0).double().mean()))
            out = tmp_path / f"{algorithm}-{k}.jsonl"
            assert main(["eval", "--model", str(export), "--data", str(path), "--out", str(out)]) == 0
            scored = [json.loads(line) for line in out.read_text().splitlines()]
            columns = ["chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps"]
            assert torch.tensor([[r[c] for c in columns] for r in scored], dtype=torch.float64) == pytest.approx(
                rows, abs=1e-4
            )
            eval_summary = json.loads((tmp_path / f"{algorithm}-{k}.summary.json").read_text())
            assert eval_summary["truncated_prompts"] == eval_summary["truncated_completions"] == 0
            assert eval_summary["accuracy"] == pytest.approx(accuracies[-1])
            assert eval_summary["beta"] == beta  # the export's β, read from its distdpo.json
        assert sum(accuracies) / len(accuracies) == pytest.approx(summary["runs"][label]["final"]["pref_accuracy"])


def test_decentralized_nodes_are_exported_and_average_to_the_exported_model(decentralized):
    export = decentralized / "run" / "models" / "run"
    nodes = sorted((export / "nodes").iterdir())
    assert [n.name for n in nodes] == ["client0", "client1", "client2"]
    adapters = [load_file(str(n / "adapter_model.safetensors")) for n in nodes]
    average = load_file(str(export / "adapter_model.safetensors"))
    for key, value in average.items():
        assert torch.stack([a[key] for a in adapters]).mean(0) == pytest.approx(value, abs=1e-6)
    info = json.loads((nodes[1] / "distdpo.json").read_text())
    assert (info["model"], info["node"], info["base_dir"]) == ("node", "client1", "../../base")


def test_an_export_is_a_starting_model_and_a_reference(decentralized):
    """policy.model = an export starts from the exported model (its fresh adapter is a no-op); policy.reference_model
    = an export scores the reference with it; both are in the model fingerprint the caches are keyed by."""
    export = decentralized / "run" / "models" / "run"
    table = tiny_lm_table(decentralized / "pairs.jsonl")
    continued = build.build_task(from_dict({**table, "policy": {**table["policy"], "model": str(export)}}))
    against = build.build_task(from_dict({**table, "policy": {**table["policy"], "reference_model": str(export)}}))
    fresh = build.build_task(from_dict(table))
    ids = torch.cat(fresh.eval)
    start = continued.reference(ids)  # the merged export, adapter disabled (a fresh adapter adds nothing anyway)
    assert against.reference(ids) == pytest.approx(start, abs=1e-4)
    assert not torch.allclose(fresh.reference(ids), start, atol=1e-3)  # training moved the model
    fingerprints = {t.fingerprint()["model"] for t in (continued, against, fresh)}
    assert len(fingerprints) == 3


def test_a_checkpoint_export_survives_an_interrupted_run(tmp_path, monkeypatch):
    data = tmp_path / "pairs.jsonl"
    write_arithmetic_pairs(data, 24)
    config = tmp_path / "run.toml"
    table = tiny_lm_table(data, checkpoint_every=1, checkpoint_dir=str(tmp_path / "ckpt"), export_every_checkpoint=True)
    table["algorithm"].update(rounds=2, local_steps=1)
    write_config(config, table)
    inject = faults.inject

    def interrupt(rank, round_index):
        if round_index == 2:
            raise KeyboardInterrupt
        inject(rank, round_index)

    monkeypatch.setattr(faults, "inject", interrupt)
    assert main(["run", str(config), "--out", str(tmp_path / "run")]) == 130
    info = json.loads((tmp_path / "run" / "models" / "run" / "distdpo.json").read_text())
    assert (info["round"], info["final"], info["metrics"]["round"]) == (1, False, 1)
    monkeypatch.setattr(faults, "inject", inject)
    assert main(["run", str(config), "--out", str(tmp_path / "run")]) == 0  # continues from the checkpoint
    info = json.loads((tmp_path / "run" / "models" / "run" / "distdpo.json").read_text())
    assert (info["round"], info["final"]) == (2, True)
    assert not [p for p in (tmp_path / "run" / "models").iterdir() if p.name != "run"]  # no temporary left over


def test_a_directory_distdpo_did_not_write_is_not_replaced(tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    write_arithmetic_pairs(data, 24)
    config = tmp_path / "run.toml"
    table = tiny_lm_table(data)
    table["algorithm"].update(rounds=1, local_steps=1)
    write_config(config, table)
    (tmp_path / "run" / "models" / "run").mkdir(parents=True)
    (tmp_path / "run" / "models" / "run" / "notes.txt").write_text("mine")
    (tmp_path / "run" / ".distdpo-run.json").write_text("{}")
    assert main(["run", str(config), "--out", str(tmp_path / "run")]) == 2
    assert "distdpo did not write" in capsys.readouterr().err
    assert (tmp_path / "run" / "models" / "run" / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_torchdist_ranks_export_the_simulators_model_and_nodes(tmp_path):
    """Rank 0 alone writes; the node rows it writes are gathered from every rank."""
    from test_torchdist import _torchrun

    data = tmp_path / "pairs.jsonl"
    write_arithmetic_pairs(data, 24)
    table = tiny_lm_table(data, save_node_models=True)
    table["algorithm"].update(name="dsgd", rounds=2, local_steps=1)
    config = tmp_path / "run.toml"
    write_config(config, table)
    assert main(["run", str(config), "--out", str(tmp_path / "sim")]) == 0
    proc, _ = _torchrun(2, config, "--out", str(tmp_path / "dist"), "--set", 'engine.name="torchdist"', timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for sub in ("", "nodes/client0", "nodes/client1", "nodes/client2"):
        simulated = load_file(str(tmp_path / "sim" / "models" / "run" / sub / "adapter_model.safetensors"))
        distributed = load_file(str(tmp_path / "dist" / "models" / "run" / sub / "adapter_model.safetensors"))
        for key, value in simulated.items():
            assert distributed[key] == pytest.approx(value, abs=1e-5)


def test_full_fine_tuning_exports_a_save_pretrained_model_and_its_built_in_base(tmp_path):
    data = tmp_path / "pairs.jsonl"
    write_arithmetic_pairs(data, 24)
    table = tiny_lm_table(data)
    table["policy"]["lora_r"] = 0
    table["algorithm"].update(rounds=1, local_steps=1, lr=0.1)
    config = tmp_path / "run.toml"
    write_config(config, table)
    assert main(["run", str(config), "--out", str(tmp_path / "run")]) == 0
    export = tmp_path / "run" / "models" / "run"
    assert json.loads((export / "distdpo.json").read_text())["format"] == "model"
    trained, base = (load_file(str(d / "model.safetensors")) for d in (export, export / "base"))
    assert trained.keys() == base.keys() and any(not torch.equal(trained[k], base[k]) for k in trained)
    for model in (export, export / "base"):  # plain model directories, with their tokenizer
        assert main(["eval", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "s.jsonl")]) == 0
