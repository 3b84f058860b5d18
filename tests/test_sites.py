"""Per-site data (data.source = "local"): each site reads only its own files, with the numbers of the pooled split."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from helpers import PANDALM, need

from distdpo.cli import main
from distdpo.config import ConfigError, from_dict

LM = """
[policy]
kind = "causal_lm"
model = "{model}"
max_length = 48
lora_r = 2
[algorithm]
name = "{algorithm}"
rounds = 2
local_steps = 1
batch_size = 2
lr = 0.5
[engine]
progress = false
"""
POOLED = """
[data]
source = "{source}"
format = "pandalm"
partition = "natural"
label_column = "annotator"
max_pairs = 48
eval_fraction = 0.25
loss_pairs_per_client = 2
"""
LOCAL = """
[data]
source = "local"
site_data = "{sites}"
eval_fraction = 0.25
loss_pairs_per_client = 2
"""


def final_row(run_dir) -> dict:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))[-1]


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    """PandaLM's annotators as three sites (a `distdpo split` directory) and a built-in model made once from text
    that is no site's training data (the held-out files: the operator's choice)."""
    root = tmp_path_factory.mktemp("sites")
    pooled = root / "pooled.toml"
    pooled.write_text(POOLED.format(source=need(PANDALM)) + LM.format(model="builtin:gpt2-tiny", algorithm="fedavg"))
    assert main(["split", str(pooled), "--out", str(root / "split")]) == 0
    text = root / "tokenizer.txt"
    text.write_text(
        "\n".join(
            line for path in sorted((root / "split").glob("*/eval.jsonl")) for line in path.read_text().splitlines()
        )
    )
    assert main(["init-model", "builtin:gpt2-tiny", "--tokenizer-text", str(text), "--out", str(root / "model")]) == 0
    return root


@pytest.mark.parametrize("algorithm", ["fedavg", "dsgd"])
def test_per_site_files_give_the_pooled_split_numbers(sites, algorithm, tmp_path):
    """The same pairs read per site, or loaded and split by one process, train to the same metrics."""
    model = sites / "model"
    pooled, local = tmp_path / "pooled.toml", tmp_path / "local.toml"
    pooled.write_text(POOLED.format(source=PANDALM) + LM.format(model=model, algorithm=algorithm))
    local.write_text(LOCAL.format(sites=sites / "split") + LM.format(model=model, algorithm=algorithm))
    assert main(["run", str(pooled), "--out", str(tmp_path / "a")]) == 0
    assert main(["run", str(local), "--out", str(tmp_path / "b")]) == 0
    a, b = final_row(tmp_path / "a"), final_row(tmp_path / "b")
    for column in ("global_loss", "grad_norm_sq", "heterogeneity", "eval_loss", "pref_accuracy", "reward_margin"):
        assert float(b[column]) == pytest.approx(float(a[column]), rel=1e-5, abs=1e-7), column
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert "per-site files" in summary["data"] and "simulation" in summary["data"]


def test_a_site_without_held_out_file_holds_out_whole_prompts_of_its_own(sites, tmp_path):
    from distdpo.data.partition import prompt_key
    from distdpo.data.sites import local_split

    for folder in (sites / "split").iterdir():
        if folder.is_dir():
            (tmp_path / folder.name).mkdir()
            (tmp_path / folder.name / "train.jsonl").write_text((folder / "train.jsonl").read_text())
    (tmp_path / "manifest.json").write_text((sites / "split" / "manifest.json").read_text())
    cfg = from_dict({"data": {"source": "local", "site_data": str(tmp_path)}} | _lm(sites))
    split = local_split(cfg)
    assert all(len(e) for e in split.eval)
    for train, held in zip(split.train, split.eval):
        trained = {prompt_key(split.data.prompt[i]) for i in train}
        assert not trained & {prompt_key(split.data.prompt[i]) for i in held}


def test_a_process_opens_only_the_files_of_the_sites_it_holds(sites):
    from distdpo.data.sites import local_split

    cfg = from_dict({"data": {"source": "local", "site_data": str(sites / "split")}} | _lm(sites))
    split = local_split(cfg, held=[1])
    folder = json.loads((sites / "split" / "manifest.json").read_text())["clients"][1]["dir"]
    assert sorted(split.files) == sorted(str(sites / "split" / folder / f) for f in ("train.jsonl", "eval.jsonl"))
    assert [bool(len(t)) for t in split.train] == [False, True, False]


def _lm(sites) -> dict:
    return {"policy": {"kind": "causal_lm", "model": str(sites / "model"), "max_length": 48, "lora_r": 2}}


@pytest.mark.parametrize(
    "data, policy, words",
    [
        ({"source": "local"}, {"model": "builtin:gpt2-tiny"}, "init-model"),
        ({"source": "local", "site_data": "/nowhere/{client}.jsonl"}, {"model": "MODEL"}, "data.clients"),
        ({"source": "local", "site_data": "/nowhere"}, {"model": "MODEL"}, "neither a directory"),
    ],
)
def test_per_site_mistakes_are_named(sites, data, policy, words):
    from distdpo.build import build_task

    policy = {"kind": "causal_lm", **{k: str(sites / "model") if v == "MODEL" else v for k, v in policy.items()}}
    with pytest.raises(ConfigError, match=words):
        build_task(from_dict({"data": data, "policy": policy}))


def test_held_out_file_sharing_a_prompt_with_training_is_refused(sites, tmp_path):
    first = next(p for p in sorted((sites / "split").iterdir()) if p.is_dir())
    (tmp_path / "a.jsonl").write_text((first / "train.jsonl").read_text())
    (tmp_path / "a.eval.jsonl").write_text((first / "train.jsonl").read_text().splitlines()[0] + "\n")
    cfg = {"source": "local", "site_data": str(tmp_path / "{client}.jsonl"), "clients": ["a"]}
    cfg["site_eval"] = str(tmp_path / "{client}.eval.jsonl")
    from distdpo.build import build_task

    with pytest.raises(ConfigError, match="share a prompt"):
        build_task(from_dict({"data": cfg} | _lm(sites)))


@pytest.mark.slow
def test_torchrun_ranks_read_only_their_sites_and_match_the_simulator(sites, tmp_path):
    """2 gloo ranks over 3 sites (rank 0: two, rank 1: one): each opens only its sites' files; FedAvg and DSGD give
    the simulator's numbers on the same files; the metrics are combined from every rank's per-client reports."""
    from test_torchdist import _assert_same_finals, _torchrun

    config = tmp_path / "local.toml"
    config.write_text(
        LOCAL.format(sites=sites / "split")
        + LM.format(model=sites / "model", algorithm="fedavg")
        + '[sweep]\n"algorithm.name" = ["fedavg", "dsgd"]\n'
    )
    assert main(["run", str(config), "--out", str(tmp_path / "sim")]) == 0
    proc, _ = _torchrun(2, config, "--out", str(tmp_path / "td"), "--set", "engine.name=torchdist", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = json.loads((tmp_path / "sim" / "summary.json").read_text())
    got = json.loads((tmp_path / "td" / "summary.json").read_text())
    _assert_same_finals(expected, got, rtol=1e-4)
    folders = [c["dir"] for c in json.loads((sites / "split" / "manifest.json").read_text())["clients"]]
    for run in got["runs"].values():
        files = run["torchdist"]["files_read"]
        opened = [{Path(f).parent.name for f in rank} for rank in files]
        assert opened == [set(folders[:2]), set(folders[2:])]
        assert (
            run["data_stats"]["train_pairs"]
            == expected["runs"][next(iter(expected["runs"]))]["data_stats"]["train_pairs"]
        )


def test_init_model_refuses_an_empty_vocabulary(tmp_path):
    (tmp_path / "text.txt").write_text("hello world\nfoo bar\n")
    args = ["init-model", "builtin:gpt2-tiny", "--tokenizer-text", str(tmp_path / "text.txt")]
    assert main([*args, "--out", str(tmp_path / "model"), "--vocab-size", "0"]) == 2
    assert not (tmp_path / "model").exists()


def test_a_named_held_out_file_is_one_per_site_and_never_silently_replaced(sites, tmp_path):
    from distdpo.data.sites import site_files

    split = str(sites / "split")
    with pytest.raises(ConfigError, match="must contain"):  # one file for every site would belong to none
        site_files(
            from_dict(
                {"data": {"source": "local", "site_data": split, "site_eval": str(tmp_path / "e.jsonl")}} | _lm(sites)
            )
        )
    typo = {"source": "local", "site_data": split, "site_eval": str(tmp_path / "{client}.missing.jsonl")}
    from distdpo.build import build_task

    with pytest.raises(ConfigError, match=r"missing\.jsonl does not exist"):  # not a silent split of its own pairs
        build_task(from_dict({"data": typo} | _lm(sites)))
