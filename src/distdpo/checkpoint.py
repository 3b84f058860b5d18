"""Checkpoints of one run every ``engine.checkpoint_every`` rounds, and resume, for the simulator and torchdist.

Layout under ``<engine.checkpoint_dir>/<run label>/``:

* ``rNNNNNN-rankK.safetensors`` — the algorithm state of the rows rank K holds
  (parameters, SCAFFOLD / tracking state, server optimizer, generator states),
  written by rank K (on its own machine: no shared file system needed);
* ``checkpoint.json`` — round, world size, config, the recorder's rows and byte
  count, wall time; written by rank 0 only after every rank has written its
  tensors, and naming their round.

Every file is written to a temporary name and renamed; older tensor files are
removed only after the JSON names the new ones, so a crash at any moment leaves
one complete checkpoint. A run finds its checkpoint and continues from it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from distdpo.config import Config, ConfigError
from distdpo.fingerprint import mismatch
from distdpo.io import file_name, write_bytes_atomic, write_json_atomic

# Keys that may differ between the run that wrote a checkpoint and the one resuming it.
FREE_KEYS = (
    ("algorithm", "rounds"),
    ("engine", "progress"),
    ("engine", "checkpoint_every"),
    ("engine", "timeout_s"),
    ("engine", "export_every_checkpoint"),
    ("engine", "save_node_models"),
)


class Sync(Protocol):
    """The little coordination a checkpoint needs between the parts of one run."""

    rank: int
    world_size: int

    def barrier(self) -> None: ...
    def broadcast(self, obj: Any) -> Any: ...  # rank 0's object, on every rank
    def check(self, error: str | None) -> None: ...  # raise on every rank if any rank reports an error


class LocalSync:
    """One process holds the whole run (the simulator)."""

    rank, world_size = 0, 1

    def barrier(self) -> None:
        pass

    def broadcast(self, obj: Any) -> Any:
        return obj

    def check(self, error: str | None) -> None:
        if error:
            raise ConfigError(error)


def _comparable(cfg: Config) -> dict:
    table = cfg.to_dict()
    table.pop("sweep", None)
    for section, key in FREE_KEYS:
        table[section].pop(key, None)
    return json.loads(json.dumps(table))


def _nan(v):
    return math.nan if v is None else v


class RunCheckpoint:
    """Saves one run's state every N rounds and restores the latest one (a no-op when checkpoints are off)."""

    def __init__(self, cfg: Config, label: str, sync: Sync | None = None, fingerprint: dict | None = None):
        self.every = cfg.engine.checkpoint_every
        self.fingerprint = fingerprint  # the task's (data, model): a checkpoint of other data is never resumed
        self.sync = sync or LocalSync()
        self.dir = Path(cfg.engine.checkpoint_dir) / file_name(label) if self.every else None
        self.config = _comparable(cfg)
        self.rounds = cfg.algorithm.rounds

    def _tensors(self, round_index: int, rank: int) -> Path:
        return self.dir / f"r{round_index:06d}-rank{rank}.safetensors"

    def due(self, round_index: int) -> bool:
        return bool(self.every) and (round_index % self.every == 0 or round_index == self.rounds)

    def save(
        self, round_index: int, algo, rec, wall_time_s: float, extra: dict[str, torch.Tensor] | None = None
    ) -> None:
        """Write this rank's tensors, then (rank 0) the JSON; ``rec`` is the recorder (rank 0) or None."""
        s = self.sync
        tensors = {**algo.state_dict(), **{f"engine.{k}": v for k, v in (extra or {}).items()}}
        write_bytes_atomic(
            self._tensors(round_index, s.rank),
            st_save({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}),
        )
        s.barrier()  # every rank's tensors are on disk before the JSON points at them
        if s.rank == 0:
            write_json_atomic(
                self.dir / "checkpoint.json",
                {
                    "round": round_index,
                    "world_size": s.world_size,
                    "config": self.config,
                    "fingerprint": self.fingerprint,
                    "wall_time_s": wall_time_s,
                    "total_bytes": rec.total_bytes,
                    "rows": rec.rows,
                },
            )
        s.barrier()
        for old in self.dir.glob(f"r*-rank{s.rank}.safetensors"):
            if old != self._tensors(round_index, s.rank):
                old.unlink(missing_ok=True)

    def restore(self, algo, rec) -> tuple[int, float, dict[str, torch.Tensor]]:
        """Load the latest checkpoint if there is one: (round it ended, wall time, engine tensors).

        Without one: (0, 0.0, {}).
        """
        if not self.every:
            return 0, 0.0, {}
        s = self.sync
        meta = s.broadcast(self._read_meta() if s.rank == 0 else None)
        if isinstance(meta, str):  # rank 0 found a checkpoint that does not fit: every rank stops
            raise ConfigError(meta)
        if meta is None:
            return 0, 0.0, {}
        error, tensors = None, {}
        path = self._tensors(meta["round"], s.rank)
        try:
            tensors = st_load(path.read_bytes())
            algo.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("engine.")})
        except (OSError, ValueError, KeyError) as e:
            error = f"rank {s.rank}: cannot resume from {path}: {e}"
        s.check(error)
        if rec is not None:
            rec.rows = [{k: _nan(v) for k, v in row.items()} for row in meta["rows"]]
            rec.total_bytes = int(meta["total_bytes"])
        extra = {k[len("engine.") :]: v for k, v in tensors.items() if k.startswith("engine.")}
        return int(meta["round"]), float(meta["wall_time_s"]), extra

    def _read_meta(self) -> dict | str | None:
        path = self.dir / "checkpoint.json"
        if not path.exists():
            return None
        try:
            meta = json.loads(path.read_text())
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
            for key, kind in (
                ("round", int),
                ("world_size", int),
                ("config", dict),
                ("rows", list),
                ("total_bytes", int),
                ("wall_time_s", (int, float)),
            ):
                if not isinstance(meta.get(key), kind):
                    raise ValueError(f"its {key!r} is missing or not a {getattr(kind, '__name__', 'number')}")
        except ValueError as e:
            return f"checkpoint {path} is damaged ({e}); remove its folder or use another engine.checkpoint_dir"
        if meta["config"] != self.config:
            return (
                f"checkpoint {path} was written by a different config; use another engine.checkpoint_dir or remove it"
            )
        changed = (
            mismatch(meta.get("fingerprint"), self.fingerprint, f"checkpoint {path}") if self.fingerprint else None
        )
        if changed:
            return f"{changed}; refusing to resume from it (use another engine.checkpoint_dir or remove it)"
        if meta["world_size"] != self.sync.world_size:
            return (
                f"checkpoint {path} was written by {meta['world_size']} ranks, this run has {self.sync.world_size}; "
                "resume with the same number of processes"
            )
        if meta["round"] > self.rounds:
            return f"checkpoint {path} is at round {meta['round']}, beyond algorithm.rounds = {self.rounds}"
        return meta
