"""What the Flower ServerApp and ClientApp share: record keys, the config on the wire, tensors ↔ records."""

from __future__ import annotations

import os

# Flower sends usage telemetry to flower.ai unless told not to; distdpo runs offline by default.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import tomllib  # noqa: E402

import numpy as np  # noqa: E402
import tomli_w  # noqa: E402
import torch  # noqa: E402
from flwr.app import Array, ArrayRecord  # noqa: E402

from distdpo.config import Config, from_dict  # noqa: E402

# Keys in the records (Flower's own names where it has them: "num-examples", "proximal-mu", "server-round").
THETA = "theta"  # the flat parameter vector θ
CORRECTION = "correction"  # SCAFFOLD's c − c_i, sent by the server
CONFIG = "distdpo-config"  # the run's distdpo config as TOML, so every node builds the same task
RNG_STATE = "batch-rng-state"  # state of the minibatch generator (seed + 1) at the start of the round
NUM_EXAMPLES = "num-examples"
PARTITION = "partition-id"
NUM_PARTITIONS = "num-partitions"
DRIFT = "client-drift"


def config_text(cfg: Config) -> str:
    """The run config as TOML (no sweep: one run)."""
    table = cfg.to_dict()
    table.pop("sweep", None)
    return tomli_w.dumps(table)


def config_from_text(text: str) -> Config:
    return from_dict(tomllib.loads(text))


_TASKS: dict[str, object] = {}


def task_for(text: str):
    """The task of a config, built once per process (a SuperNode serves many rounds of one run)."""
    if text not in _TASKS:
        from distdpo import build

        _TASKS.clear()  # one run at a time per node: keep memory flat
        _TASKS[text] = build.build_task(config_from_text(text))
    return _TASKS[text]


def num_examples(cfg: Config, size: int) -> float:
    """Flower's FedAvg weighs replies by this: |D_i| (``size``) for p_i ∝ |D_i|, 1 for uniform weighting."""
    from distdpo import build

    return float(size) if build.aggregation(cfg) == "size" else 1.0


def to_record(**tensors: torch.Tensor) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v.detach().cpu().numpy())) for k, v in tensors.items()})


def from_record(record: ArrayRecord, key: str, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.from_numpy(record[key].numpy().copy()).to(dtype=dtype, device=device)


def rng_to_bytes(gen: torch.Generator) -> bytes:
    return bytes(gen.get_state().numpy().tobytes())


def rng_from_bytes(data: bytes) -> torch.Generator:
    gen = torch.Generator()
    gen.set_state(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    return gen
