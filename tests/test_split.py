"""Held-out pairs are grouped by prompt across all clients, and ``distdpo split`` writes each client's files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import EXAMPLES, HH, HHH, PANDALM, need

from distdpo.cli import main
from distdpo.config import from_dict
from distdpo.data.partition import prompt_key, train_eval_split
from distdpo.data.split import split_text_data

EXAMPLE_DATA = [
    ("pandalm_decentralized.toml", PANDALM),
    ("hh_fedavg_dirichlet.toml", HH),
    ("hhh_by_category.toml", HHH),
]


def _read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("example,data", EXAMPLE_DATA, ids=[e for e, _ in EXAMPLE_DATA])
def test_split_command_writes_each_client_and_no_held_out_prompt_is_trained_on(example, data, tmp_path, capsys):
    out = tmp_path / "split"
    assert main(["split", str(EXAMPLES / example), "--out", str(out), "--set", f'data.source="{need(data)}"']) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    train_prompts, eval_prompts, n_eval = set(), set(), 0
    for client in manifest["clients"]:
        train, held = _read(out / client["dir"] / "train.jsonl"), _read(out / client["dir"] / "eval.jsonl")
        assert (len(train), len(held)) == (client["train_pairs"], client["eval_pairs"])
        assert all({"prompt", "chosen", "rejected"} <= set(r) for r in train + held)
        triples = [(prompt_key(r["prompt"]), prompt_key(r["chosen"]), prompt_key(r["rejected"])) for r in train + held]
        assert len(set(triples)) == len(triples)  # exact duplicates are dropped within a client
        train_prompts |= {prompt_key(r["prompt"]) for r in train}
        eval_prompts |= {prompt_key(r["prompt"]) for r in held}
        n_eval += len(held)
    assert n_eval > 0 and not (train_prompts & eval_prompts)
    stats = manifest["data_stats"]
    assert {"pairs", "pairs_sharing_prompt", "exact_duplicates", "duplicates_dropped_within_client"} <= set(stats)
    assert stats["train_pairs"] + stats["eval_pairs"] + stats["duplicates_dropped_within_client"] <= stats["pairs"]
    assert manifest["config"]["data"]["source"] == str(data)
    # an existing, non-empty directory is never written into
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(["split", str(EXAMPLES / example), "--out", str(out), "--set", f'data.source="{data}"']) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert before == {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}


def test_pandalm_votes_have_duplicates_across_annotators():
    cfg = from_dict(
        {
            "data": {
                "source": str(need(PANDALM)),
                "format": "pandalm",
                "partition": "natural",
                "label_column": "annotator",
                "eval_fraction": 0.15,
            },
            "policy": {"kind": "causal_lm"},
        }
    )
    s = split_text_data(cfg).stats
    assert s["exact_duplicates"] > 1000 and s["pairs_sharing_prompt"] > 2000  # the leak the grouping prevents


@pytest.mark.parametrize(
    "partition,label", [("iid", ""), ("dirichlet", "application"), ("natural", "annotator"), ("quantity", "")]
)
def test_every_partition_holds_out_whole_prompts(partition, label):
    cfg = from_dict(
        {
            "data": {
                "source": str(need(PANDALM)),
                "format": "pandalm",
                "partition": partition,
                "label_column": label,
                "num_clients": 3 if partition == "natural" else 5,
                "eval_fraction": 0.2,
            },
            "policy": {"kind": "causal_lm"},
        }
    )
    split = split_text_data(cfg)
    key = lambda i: prompt_key(split.data.prompt[i])  # noqa: E731
    train = {key(i) for t in split.train for i in t}
    held = {key(i) for e in split.eval for i in e}
    assert held and not (train & held)
    assert all(len(t) > 0 for t in split.train)
    total = sum(len(t) + len(e) for t, e in zip(split.train, split.eval))
    assert 0.1 < split.stats["eval_pairs"] / total < 0.3


def test_grouped_split_keeps_groups_whole_and_every_client_training():
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 30, size=120).tolist()  # 30 prompts shared by 120 items
    clients = np.array_split(rng.permutation(120), 4)
    train, held = train_eval_split(clients, 0.25, seed=1, groups=groups)
    held_groups = {groups[i] for e in held for i in e}
    assert held_groups and not held_groups & {groups[i] for t in train for i in t}
    for c, tr, ev in zip(clients, train, held):
        assert sorted(np.concatenate([tr, ev]).tolist()) == sorted(c.tolist())
        assert len(tr) >= 1 and len(ev) >= 1
    # one prompt held by every client: it cannot be held out without leaving a client nothing to train on
    train, held = train_eval_split([np.array([0]), np.array([1, 2])], 0.5, groups=["p", "p", "q"])
    assert train[0].tolist() == [0] and 0 not in held[0]
