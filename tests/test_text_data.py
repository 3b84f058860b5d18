"""Text preference loaders (real shared data + tiny hand-written files) and client partitioners."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import HH, HHH, PANDALM, need

from distdpo.data.partition import PARTITIONS, partition, train_eval_split
from distdpo.data.text import (
    FORMATS,
    DataFormatError,
    TextPreferenceData,
    detect_format,
    load_preferences,
    render_chat_fallback,
)


def write_jsonl(path: Path, records: list, gz: bool = False) -> Path:
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------
# real data


@pytest.fixture(scope="module")
def hh() -> TextPreferenceData:
    need(HH)
    return load_preferences(HH)


@pytest.fixture(scope="module")
def pandalm_votes() -> TextPreferenceData:
    need(PANDALM)
    return load_preferences(PANDALM)


def test_hh_rlhf_counts_and_prompt_split(hh):
    s = hh.stats
    assert s["raw_records"] == 2312
    dropped = s["dropped_empty"] + s["dropped_identical"] + s["dropped_non_string"]
    assert s["pairs"] + dropped == 2312 and len(hh) == s["pairs"]
    raw = [json.loads(line) for line in gzip.open(HH, "rt", encoding="utf-8")]
    for k in (0, 1, 17, len(hh) // 2, len(hh) - 1):
        rec = raw[hh.column("source_index")[k]]
        p = hh.prompt[k]
        assert p.endswith("\n\nAssistant:") and p.startswith("\n\nHuman:")
        # leading space kept: prompt + completion is exactly the raw dialogue
        assert p + hh.chosen[k] == rec["chosen"]
        assert p + hh.rejected[k] == rec["rejected"]
        assert hh.chosen[k].startswith(" ") and "\n\nHuman:" not in hh.chosen[k]


def test_hh_rlhf_shared_all_but_last_turn(hh):
    # multi-turn dialogues: the prompt includes earlier assistant turns
    multi = [p for p in hh.prompt if p.count("\n\nAssistant:") > 1]
    assert len(multi) > 100


def test_pandalm_votes(pandalm_votes):
    d = pandalm_votes
    s = d.stats
    assert s["raw_records"] == 999
    degenerate = s["dropped_empty"] + s["dropped_identical"] + s["dropped_non_string"]
    assert s["pairs"] + degenerate == 2671  # the README's non-tie votes
    assert s["dropped_ties"] == 3 * 999 - 2671
    assert sorted(set(d.column("annotator"))) == ["annotator1", "annotator2", "annotator3"]
    # 50 apps in the file, but all 9 items of "https://abcnotation.com/" are 3-way ties
    assert len(set(d.column("application"))) == 49
    with pytest.raises(KeyError, match="available columns"):
        d.column("nope")


def test_pandalm_chosen_is_voted_response(pandalm_votes):
    items = json.loads(PANDALM.read_text(encoding="utf-8"))
    d = pandalm_votes
    # record 0 by hand: all three annotators prefer response2
    assert [items[0][f"annotator{j}"] for j in (1, 2, 3)] == [2, 2, 2]
    first = [k for k, i in enumerate(d.column("source_index")) if i == 0]
    assert len(first) == 3
    for k in first:
        assert d.chosen[k] == items[0]["response2"] and d.rejected[k] == items[0]["response1"]
        assert d.prompt[k] == items[0]["instruction"] + "\n\n" + items[0]["input"]
    # every pair, against the raw vote
    for k in range(len(d)):
        item = items[d.column("source_index")[k]]
        vote = item[d.column("annotator")[k]]
        assert d.chosen[k] == item[f"response{vote}"] and d.rejected[k] == item[f"response{3 - vote}"]


def test_pandalm_majority():
    need(PANDALM)
    d = load_preferences(PANDALM, pandalm_mode="majority")
    s = d.stats
    assert len(d) <= 999
    assert s["pairs"] + s["dropped_ties"] + s["dropped_empty"] + s["dropped_non_string"] + s["dropped_identical"] == 999
    assert all(c > r for c, r in zip(d.column("votes_chosen"), d.column("votes_rejected")))
    with pytest.raises(ValueError, match="pandalm_mode"):
        load_preferences(PANDALM, pandalm_mode="mean")


def test_hhh():
    need(HHH)
    d = load_preferences(HHH)
    assert len(d) == 221
    assert sorted(set(d.column("category"))) == ["harmless", "helpful", "honest", "other"]
    assert detect_format(json.loads(HHH.read_text().splitlines()[0])) == "trl"


def test_natural_partition_by_annotator(pandalm_votes):
    d = pandalm_votes
    clients, names = partition(len(d), None, "natural", labels=d.column("annotator"))
    assert names == ["annotator1", "annotator2", "annotator3"]
    assert sum(map(len, clients)) == len(d)
    for idx, name in zip(clients, names):
        assert all(d.column("annotator")[i] == name for i in idx)
    sub = d.select(clients[1])
    assert set(sub.column("annotator")) == {"annotator2"} and sub.stats == d.stats


# ---------------------------------------------------------------------------
# tiny TRL / SHP / UltraFeedback files


EXPLICIT = [
    {"prompt": "Q1?", "chosen": "good", "rejected": "bad", "category": "a"},
    {"prompt": "Q2?", "chosen": "yes", "rejected": "no", "category": "b"},
]


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "json-list", "json-lines", "parquet", "csv"])
def test_trl_explicit_file_types(tmp_path, kind):
    if kind == "jsonl":
        path = write_jsonl(tmp_path / "d.jsonl", EXPLICIT)
    elif kind == "jsonl.gz":
        path = write_jsonl(tmp_path / "d.jsonl.gz", EXPLICIT, gz=True)
    elif kind == "json-list":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(EXPLICIT, indent=2))
    elif kind == "json-lines":
        path = write_jsonl(tmp_path / "d.json", EXPLICIT)
    else:
        import pandas as pd

        path = tmp_path / f"d.{kind}"
        df = pd.DataFrame(EXPLICIT)
        df.to_parquet(path) if kind == "parquet" else df.to_csv(path, index=False)
    d = load_preferences(path)
    assert d.prompt == ["Q1?", "Q2?"] and d.chosen == ["good", "yes"] and d.rejected == ["bad", "no"]
    assert d.column("category") == ["a", "b"] and d.column("source_index") == [0, 1]
    assert load_preferences(path, "trl", max_records=1).prompt == ["Q1?"]


def test_trl_implicit_prompt(tmp_path):
    path = write_jsonl(
        tmp_path / "i.jsonl",
        [
            {"chosen": "The sky is blue.", "rejected": "The sky is green."},
            {"chosen": "abc", "rejected": "abd"},
        ],
    )
    d = load_preferences(path)
    # longest common prefix; a trailing space moves to the completions (as TRL)
    assert d.prompt == ["The sky is", "ab"]
    assert d.chosen == [" blue.", "c"] and d.rejected == [" green.", "d"]


def _conversational():
    return [
        {
            "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
            "chosen": [{"role": "assistant", "content": "Hello."}],
            "rejected": [{"role": "assistant", "content": "Go away."}],
            "category": "x",
        },
        {  # implicit prompt
            "chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
            "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}],
        },
    ]


def test_trl_conversational_fallback_template(tmp_path):
    d = load_preferences(write_jsonl(tmp_path / "c.jsonl", _conversational()))
    assert d.prompt[0] == "System: Be brief.\n\nUser: Hi?\n\nAssistant:"
    assert d.chosen[0] == " Hello." and d.rejected[0] == " Go away."
    assert d.prompt[1] == "User: 2+2?\n\nAssistant:" and (d.chosen[1], d.rejected[1]) == (" 4", " 5")
    assert d.column("category") == ["x", None]
    full = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    assert d.prompt[1] + d.chosen[1] == render_chat_fallback(full)[: -len("\n\nAssistant:")]


def _tiny_chat_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    fast.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return fast


def test_trl_conversational_chat_template(tmp_path):
    d = load_preferences(write_jsonl(tmp_path / "c.jsonl", _conversational()), tokenizer=_tiny_chat_tokenizer())
    assert d.prompt[0] == "<|system|>Be brief.\n<|user|>Hi?\n<|assistant|>"
    assert d.chosen[0] == "Hello." and d.rejected[0] == "Go away."
    assert d.prompt[1] == "<|user|>2+2?\n<|assistant|>" and (d.chosen[1], d.rejected[1]) == ("4", "5")


def test_shp_ties_and_domain(tmp_path):
    rows = [
        {
            "history": "H1",
            "human_ref_A": "a1",
            "human_ref_B": "b1",
            "labels": 1,
            "score_A": 5,
            "score_B": 2,
            "domain": "askculinary",
        },
        {
            "history": "H2",
            "human_ref_A": "a2",
            "human_ref_B": "b2",
            "labels": 0,
            "score_A": 1,
            "score_B": 9,
            "domain": "askphysics",
        },
        {"history": "H3", "human_ref_A": "a3", "human_ref_B": "b3", "score_A": 4, "score_B": 4, "domain": "askphysics"},
        {"history": "H4", "human_ref_A": "a4", "human_ref_B": "b4", "score_A": 1, "score_B": 3, "domain": "askhistory"},
    ]
    d = load_preferences(write_jsonl(tmp_path / "shp.jsonl", rows))
    assert d.prompt == ["H1", "H2", "H4"]
    assert d.chosen == ["a1", "b2", "b4"] and d.rejected == ["b1", "a2", "a4"]
    assert d.column("domain") == ["askculinary", "askphysics", "askhistory"]
    assert d.stats["dropped_ties"] == 1 and d.column("source_index") == [0, 1, 3]


def test_ultrafeedback(tmp_path):
    rows = [
        {
            "prompt": "Name a colour.",
            "prompt_id": "p0",
            "chosen": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
            "rejected": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Seven."}],
            "messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
            "score_chosen": 8.0,
            "score_rejected": 2.0,
        },
        {
            "prompt": "Tie?",
            "chosen": [{"role": "user", "content": "Tie?"}, {"role": "assistant", "content": "x"}],
            "rejected": [{"role": "user", "content": "Tie?"}, {"role": "assistant", "content": "y"}],
            "score_chosen": 5.0,
            "score_rejected": 5.0,
        },
    ]
    path = tmp_path / "uf.parquet"
    import pandas as pd

    pd.DataFrame(rows).to_parquet(path)
    d = load_preferences(path)
    assert detect_format(rows[0]) == "ultrafeedback"
    assert d.prompt == ["User: Name a colour.\n\nAssistant:"] and d.chosen == [" Blue."] and d.rejected == [" Seven."]
    assert d.column("prompt_id") == ["p0"] and d.stats["dropped_ties"] == 1
    d = load_preferences(path, tokenizer=_tiny_chat_tokenizer())
    assert d.prompt == ["<|user|>Name a colour.\n<|assistant|>"] and d.chosen == ["Blue."]


# ---------------------------------------------------------------------------
# errors and degenerate pairs


def test_bad_json_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [EXPLICIT[0], EXPLICIT[1], '{"prompt": "x", "chosen": ', EXPLICIT[0]])
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:3: invalid JSON"):
        load_preferences(path)
    d = load_preferences(path, on_error="skip")
    assert len(d) == 3 and d.stats["skipped_malformed"] == 1 and d.stats["raw_records"] == 4
    assert d.column("source_index") == [0, 1, 3]


def test_bad_json_list(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"prompt": "a", "chosen": "b", "rejected": "c"},\n  {"prompt": oops}\n]\n')
    with pytest.raises(DataFormatError, match=r"bad\.json:3: invalid JSON"):
        load_preferences(path)


def test_missing_field(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [EXPLICIT[0], {"prompt": "Q", "chosen": "c"}])
    with pytest.raises(DataFormatError, match=r"m\.jsonl:2: missing field 'rejected'"):
        load_preferences(path)
    assert load_preferences(path, on_error="skip").stats["skipped_malformed"] == 1
    with pytest.raises(ValueError, match="on_error"):
        load_preferences(path, on_error="ignore")


def test_pandalm_missing_field_line(tmp_path):
    item = {
        "instruction": "I",
        "input": "",
        "response1": "r1",
        "response2": "r2",
        "annotator1": 1,
        "annotator2": 0,
        "annotator3": 2,
    }
    path = tmp_path / "p.json"
    path.write_text(json.dumps([item, {k: v for k, v in item.items() if k != "response2"}], indent=2))
    with pytest.raises(DataFormatError, match=r"p\.json:11: missing field 'response2'"):
        load_preferences(path)
    d = load_preferences(path, on_error="skip")
    assert d.prompt == ["I", "I"] and d.chosen == ["r1", "r2"] and d.stats["dropped_ties"] == 1


def test_degenerate_pairs_counted(tmp_path):
    rows = [
        {"prompt": "p", "chosen": "  ", "rejected": "x"},
        {"prompt": "p", "chosen": "same", "rejected": "same "},
        {"prompt": "p", "chosen": None, "rejected": "x"},
        {"prompt": "p", "chosen": 3, "rejected": "x"},
        {"prompt": "p", "chosen": "ok", "rejected": "fine"},
    ]
    d = load_preferences(write_jsonl(tmp_path / "deg.jsonl", rows))
    assert len(d) == 1
    assert (d.stats["dropped_empty"], d.stats["dropped_identical"], d.stats["dropped_non_string"]) == (1, 1, 2)


def test_unknown_and_undetectable_format(tmp_path):
    path = write_jsonl(tmp_path / "u.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match="unknown format") as err:
        load_preferences(path, format="alpaca")
    assert all(f in str(err.value) for f in FORMATS)
    with pytest.raises(DataFormatError, match=r"u\.jsonl:1: cannot detect.*pandalm.*shp.*trl"):
        load_preferences(path)
    with pytest.raises(DataFormatError, match="unsupported file type"):
        load_preferences(write_jsonl(tmp_path / "x.txt", EXPLICIT))
    with pytest.raises(FileNotFoundError):
        load_preferences(tmp_path / "missing.jsonl")


def test_hub_path_routes_to_load_dataset(monkeypatch):
    import datasets

    calls = []
    rows = {"chosen": ["\n\nHuman: hi\n\nAssistant: hello"], "rejected": ["\n\nHuman: hi\n\nAssistant: go"]}

    def fake_load_dataset(path, split=None, **kwargs):
        calls.append((path, split))
        return datasets.Dataset.from_dict(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    probed = []
    monkeypatch.setattr("distdpo.hub.check_hub_id", lambda key, name, kind: probed.append((key, name, kind)))
    d = load_preferences("Anthropic/hh-rlhf", split="test")
    assert probed == [("data.source", "Anthropic/hh-rlhf", "dataset")]  # one quick probe before the download
    assert calls == [("Anthropic/hh-rlhf", "test")]
    assert d.prompt == ["\n\nHuman: hi\n\nAssistant:"] and d.chosen == [" hello"] and d.rejected == [" go"]
    load_preferences("Anthropic/hh-rlhf")
    assert calls[-1] == ("Anthropic/hh-rlhf", "train")


# ---------------------------------------------------------------------------
# partitions


def _check_partition(clients, n):
    allidx = np.concatenate(clients)
    assert len(allidx) == n and len(np.unique(allidx)) == n
    assert all(np.all(np.diff(c) > 0) for c in clients)


def _mean_tv(clients, labels):
    labels = np.asarray(labels)
    values = np.unique(labels)
    glob = np.array([(labels == v).mean() for v in values])
    tv = [0.5 * np.abs(np.array([(labels[c] == v).mean() for v in values]) - glob).sum() for c in clients]
    return float(np.mean(tv))


def test_iid_and_quantity():
    clients, names = partition(103, 10, "iid", seed=1)
    _check_partition(clients, 103)
    assert names[0] == "client0" and {len(c) for c in clients} == {10, 11}
    q, _ = partition(1000, 10, "quantity", seed=1, min_size=5, quantity_alpha=0.5)
    _check_partition(q, 1000)
    sizes = [len(c) for c in q]
    assert min(sizes) >= 5 and max(sizes) > 3 * min(sizes)
    assert [list(c) for c in partition(1000, 10, "quantity", seed=1, min_size=5)[0]] == [
        list(c) for c in partition(1000, 10, "quantity", seed=1, min_size=5)[0]
    ]


def test_dirichlet_skew():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=2000).tolist()
    skew = {}
    for alpha in (0.1, 100.0):
        clients, _ = partition(2000, 8, "dirichlet", labels=labels, alpha=alpha, seed=3, min_size=10)
        _check_partition(clients, 2000)
        assert min(map(len, clients)) >= 10
        skew[alpha] = _mean_tv(clients, labels)
    assert skew[0.1] > 0.4 > 0.1 > skew[100.0]
    with pytest.raises(ValueError, match="larger alpha"):
        partition(30, 10, "dirichlet", labels=[0, 1] * 15, alpha=0.01, min_size=3)


def test_partition_errors():
    with pytest.raises(ValueError, match="num_clients"):
        partition(10, 0, "iid")
    with pytest.raises(ValueError, match="num_clients"):
        partition(10, 11, "iid")
    with pytest.raises(ValueError, match="labels"):
        partition(10, 2, "dirichlet")
    with pytest.raises(ValueError, match="labels"):
        partition(10, None, "natural")
    with pytest.raises(ValueError, match="labels has 3"):
        partition(10, 2, "dirichlet", labels=[0, 1, 0])
    with pytest.raises(ValueError, match="alpha"):
        partition(10, 2, "dirichlet", labels=[0, 1] * 5, alpha=0)
    with pytest.raises(ValueError, match="quantity_alpha"):
        partition(10, 2, "quantity", quantity_alpha=-1)
    with pytest.raises(ValueError, match=r"num_clients=4.*3 distinct"):
        partition(6, 4, "natural", labels=list("abcabc"))
    with pytest.raises(ValueError, match="method"):
        partition(10, 2, "shards")
    assert set(PARTITIONS) == {"iid", "dirichlet", "natural", "quantity"}


def test_train_eval_split():
    clients, _ = partition(50, 4, "quantity", seed=0, min_size=1, quantity_alpha=0.3)
    clients = clients + [np.array([7]), np.array([3, 9])]
    train, held = train_eval_split(clients, 0.2, seed=5)
    for c, tr, ev in zip(clients, train, held):
        assert sorted(np.concatenate([tr, ev]).tolist()) == sorted(c.tolist())
        if len(c) >= 2:
            assert len(ev) >= 1 and len(tr) >= 1
        else:
            assert len(ev) == 0
    again, _ = train_eval_split(clients, 0.2, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip(train, again))
    assert all(len(e) == 0 for e in train_eval_split(clients, 0.0)[1])
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="eval_fraction"):
            train_eval_split(clients, bad)
