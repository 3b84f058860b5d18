import pytest
import torch

from distdpo.config import from_dict


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


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
