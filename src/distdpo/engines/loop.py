"""The round loop, written once for every engine: restore, record round 0, run rounds, evaluate, checkpoint,
export the trained model (a causal LM's, see :mod:`distdpo.lm.export`).

An engine supplies an :class:`~distdpo.algorithms.base.Algorithm` (the Flower
server is one too), a :class:`~distdpo.metrics.Recorder` (``None`` on a
torch.distributed rank that does not evaluate), a
:class:`~distdpo.checkpoint.RunCheckpoint`, and :class:`RoundHooks` for what it
adds around a round: torchdist's heartbeat and communication columns, fault
injection.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from distdpo import faults
from distdpo.algorithms.base import Algorithm
from distdpo.checkpoint import RunCheckpoint
from distdpo.config import Config
from distdpo.lm.export import export_run
from distdpo.metrics import Recorder, RunDiverged, evaluated


class RoundHooks:
    """What an engine adds around each round; the defaults are those of a single process."""

    rank = 0

    def before_round(self, round_index: int) -> None:
        faults.inject(self.rank, round_index)

    def after_round(self, stats: dict[str, float]) -> None:
        """Called on every process after each round (accumulate what the next evaluated row reports)."""

    def row_stats(self, stats: dict[str, float]) -> dict[str, float]:
        """Called on every process at an evaluated round: extra columns for its row (may communicate)."""
        return stats

    def stop_everywhere(self, diverged: bool) -> bool:
        """Whether every process stops now, given whether this one saw the run diverge."""
        return diverged

    def measure_elsewhere(self, theta: torch.Tensor) -> None:
        """Called at an evaluated round on a process without a recorder: its part of a collective evaluation."""

    def checkpoint_extra(self) -> dict[str, torch.Tensor]:
        return {}

    def restore_extra(self, extra: dict[str, torch.Tensor]) -> None:
        pass


def train_rounds(
    cfg: Config,
    label: str,
    algo: Algorithm,
    rec: Recorder | None,
    ckpt: RunCheckpoint,
    hooks: RoundHooks | None = None,
    *,
    progress: bool = True,
    device: torch.device | None = None,
) -> Any:
    """Train ``algo`` from its checkpoint (if any) to ``algorithm.rounds``; returns the final global parameters.

    Raises :class:`RunDiverged` on every process when the recorder sees the run diverge.
    """
    from tqdm.auto import tqdm

    hooks = hooks or RoundHooks()
    start, wall, extra = ckpt.restore(algo, rec)
    hooks.restore_extra(extra)
    if start == 0:
        theta = algo.global_params()  # (a collective under torchdist: every process takes part)
        if rec is not None:
            rec.record(0, theta, {}, 0.0)
        else:
            hooks.measure_elsewhere(theta)
    show = progress and cfg.engine.progress and rec is not None
    bar = tqdm(
        range(start + 1, cfg.algorithm.rounds + 1),
        desc=label,
        leave=False,
        disable=None if show else True,
        unit="round",
    )
    for r in bar:
        hooks.before_round(r)
        t0 = time.perf_counter()
        stats = algo.run_round(r - 1)
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize()
        wall += time.perf_counter() - t0
        hooks.after_round(stats)
        if evaluated(cfg, r):
            theta = algo.global_params()
            stats = hooks.row_stats(stats)
            diverged = None
            if rec is not None:
                try:
                    row = rec.record(r, theta, stats, wall)
                    bar.set_postfix(loss=f"{row['global_loss']:.4f}")
                except RunDiverged as e:
                    diverged = e
            else:
                hooks.measure_elsewhere(theta)
            if hooks.stop_everywhere(diverged is not None):  # every process stops at the same round
                bar.close()
                raise diverged or RunDiverged([], {})
        elif rec is not None:
            rec.skip(stats)
        if ckpt.due(r):
            ckpt.save(r, algo, rec, wall, hooks.checkpoint_extra())
            if cfg.engine.export_every_checkpoint and r < cfg.algorithm.rounds:
                export_run(cfg, label, algo, rec, ckpt.fingerprint, r)
    bar.close()
    theta = algo.global_params()
    export_run(cfg, label, algo, rec, ckpt.fingerprint, cfg.algorithm.rounds, theta)
    return theta


__all__ = ["RoundHooks", "train_rounds"]
