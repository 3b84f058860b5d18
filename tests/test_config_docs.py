"""README.md's configuration tables agree with the config fields: every key, its default and its choices."""

import re
import tomllib
from pathlib import Path

import pytest

from distdpo.config import KEYS, default

README = Path(__file__).resolve().parents[1] / "README.md"
CHOICE_WORD = re.compile(r"[a-z0-9_-]+")  # a backticked word that could be a choice (not a path or a key)


def _cells(line: str) -> list[str]:
    # Split on the table's pipes, not on the escaped ones inside a cell (`\|D_i\|`).
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def _ticked(text: str) -> list[str]:
    return [t.strip('"') for t in re.findall(r"`([^`]*)`", text)]


def readme_rows() -> list[tuple[int, list[str], list[str], str]]:
    """``(line number, keys, documented defaults, meaning)`` of each row of the README's key/default/meaning tables.

    A row may document several keys of one section: "`engine.dp_clip` / `dp_noise`" with defaults "0 / 0".
    """
    rows, in_table = [], False
    for number, line in enumerate(README.read_text().splitlines(), 1):
        if not line.startswith("|"):
            in_table = False
            continue
        cells = _cells(line)
        if cells[:2] == ["key", "default"]:
            in_table = True
            continue
        if not in_table or set(line) <= set("|-: "):
            continue
        names = re.findall(r"`([^`]+)`", cells[0])
        section = names[0].rpartition(".")[0]
        keys = [n if "." in n or not section else f"{section}.{n}" for n in names]
        defaults = [d.strip() for d in cells[1].split(" / ")] if cells[1] else []
        rows.append((number, keys, defaults, cells[2]))
    return rows


ROWS = readme_rows()


def parse_default(text: str):
    """A default as the README writes it: a TOML value, backticked or not (`"auto"`, 0.5, true, `[]`)."""
    return tomllib.loads(f"v = {text.strip('`')}")["v"]


def same(documented, actual) -> bool:
    # 0 documents 0.0 (TOML's integer is accepted for a float key), but not false, and 1 does not document true.
    return isinstance(documented, bool) == isinstance(actual, bool) and documented == actual


def test_the_readme_has_configuration_tables():
    assert len(ROWS) > 50 and {"seed", "algorithm.lr", "data.format", "engine.timeout_s"} <= {
        k for _, keys, _, _ in ROWS for k in keys
    }


def test_every_config_key_is_documented():
    documented = {k for _, keys, _, _ in ROWS for k in keys}
    assert sorted(set(KEYS) - documented) == []


ROW_IDS = [f"{'+'.join(keys)}@{line}" for line, keys, _, _ in ROWS]


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_every_documented_key_exists(row):
    line, keys, _, _ = row
    assert [k for k in keys if k not in KEYS] == [], f"README.md:{line}"


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_documented_defaults_are_the_field_defaults(row):
    line, keys, defaults, _ = row
    assert len(defaults) == len(keys), f"README.md:{line}: {len(keys)} keys, defaults {defaults}"
    for key, text in zip(keys, defaults):
        actual = default(key)
        assert same(parse_default(text), actual), f"README.md:{line}: {key} documented {text}, is {actual!r}"


def test_documented_choices_are_the_field_choices():
    """A row whose meaning lists values (two or more backticked words, one of them a choice of the key) lists
    every choice (the default column counts) and, for a row of one key, nothing else."""
    checked = set()
    for line, keys, defaults, meaning in ROWS:
        words = {w for w in _ticked(meaning) if CHOICE_WORD.fullmatch(w)}
        for key, text in zip(keys, defaults):
            choices = KEYS[key].metadata["choices"]
            if choices is None or len(words) < 2 or not words & set(choices):
                continue
            named = {*words, parse_default(text)}
            assert set(choices) <= named, f"README.md:{line}: {key} lists no {sorted(set(choices) - named)}"
            if len(keys) == 1:
                assert named <= set(choices), f"README.md:{line}: {key} has no {sorted(named - set(choices))}"
            checked.add(key)
    assert {"algorithm.name", "policy.loss_type", "data.format", "engine.dp_side"} <= checked


def test_engine_specific_keys_say_their_engine():
    for line, keys, _, meaning in ROWS:
        for key in keys:
            engine = KEYS[key].metadata["engine"]
            if engine:
                assert engine.lower() in meaning.lower(), f"README.md:{line}: {key} is read by engine {engine!r} only"
