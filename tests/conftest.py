"""Fixtures every test module gets; shared builders and paths live in helpers.py."""

import os

import pytest
import torch


def _env_threads() -> int:
    """OMP_NUM_THREADS when set (the suite must pass with 1 thread and with many), else 2."""
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "2").split(",")[0]))
    except ValueError:
        return 2


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(_env_threads())
