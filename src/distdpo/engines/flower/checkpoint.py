"""Checkpoints of a Flower run: global model and server state every N rounds, and resume.

A checkpoint is ``state-rNNNNNN.safetensors`` (θ, strategy arrays, SCAFFOLD's c and
c_i, generator states) plus ``checkpoint.json`` (round, config, recorder rows),
both written atomically; the JSON is written last and names its tensors file,
so a crash leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from distdpo.config import ConfigError
from distdpo.io import write_bytes_atomic, write_json_atomic

# Keys that may change between the run that wrote a checkpoint and the one resuming it.
_FREE_KEYS = {("algorithm", "rounds"), ("engine", "progress"), ("engine", "checkpoint_every")}


def _comparable(config_text: str) -> dict:
    table = tomllib.loads(config_text)
    for section, key in _FREE_KEYS:
        table.get(section, {}).pop(key, None)
    return table


class Checkpointer:
    """Saves to and resumes from ``directory`` (one directory per run label)."""

    def __init__(self, directory: str | Path, config_text: str):
        self.dir, self.config_text = Path(directory), config_text

    def save(self, round_index: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        name = f"state-r{round_index:06d}.safetensors"
        write_bytes_atomic(self.dir / name, st_save({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}))
        write_json_atomic(self.dir / "checkpoint.json", {"round": round_index, "tensors": name, "config": self.config_text, **meta})
        for old in self.dir.glob("state-r*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)

    def load(self) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]] | None:
        """The latest checkpoint (round, tensors, metadata), or None when there is none."""
        path = self.dir / "checkpoint.json"
        if not path.exists():
            return None
        meta = json.loads(path.read_text())
        if _comparable(meta["config"]) != _comparable(self.config_text):
            raise ConfigError(
                f"checkpoint {path} was written by a different config; use another engine.checkpoint_dir or remove it"
            )
        tensors = st_load((self.dir / meta["tensors"]).read_bytes())
        # JSON has no NaN: metric rows come back with None where the recorder wrote NaN.
        meta["rows"] = [{k: (math.nan if v is None else v) for k, v in row.items()} for row in meta.get("rows", [])]
        return int(meta["round"]), tensors, meta


def generator_tensor(gen: torch.Generator) -> torch.Tensor:
    return gen.get_state().clone()


def restore_generator(gen: torch.Generator, state: torch.Tensor) -> None:
    gen.set_state(state.to(torch.uint8).contiguous())
