"""Paths and small builders the test modules share (imported as ``helpers``; conftest holds fixtures only)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from distdpo.config import from_dict

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _shared_data() -> Path:
    default = ROOT.parent / "shared" / "data"
    if default.is_dir() or "DISTDPO_SHARED_DATA" not in os.environ:
        return default
    return Path(os.environ["DISTDPO_SHARED_DATA"])


SHARED = _shared_data()
HH = SHARED / "hh-rlhf" / "harmless-base-test.jsonl.gz"
PANDALM = SHARED / "pandalm" / "testset-v1.json"
HHH = SHARED / "hhh-alignment" / "hhh.jsonl"


def need(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"shared data file {path} not found (set DISTDPO_SHARED_DATA to the shared/data folder)")
    return path


# The small synthetic problem the CLI, checkpoint and torchdist tests share (6 clients, d = 4).
TINY_DATA = """[data]
num_clients = 6
pairs_per_client = 40
eval_pairs_per_client = 20
dim = 4
num_actions = 3
"""


def make_config(**sections):
    """A small config; ``sections`` maps section → dict of overrides (``seed`` may be given too)."""
    table = {
        "seed": sections.pop("seed", 0),
        "data": {"num_clients": 8, "pairs_per_client": 60, "eval_pairs_per_client": 50, "dim": 6, "num_actions": 4},
        "algorithm": {"rounds": 5, "local_steps": 3, "lr": 0.3, "batch_size": 16},
        "engine": {"progress": False},
    }
    for name, values in sections.items():
        table.setdefault(name, {}).update(values)
    return from_dict(table)
