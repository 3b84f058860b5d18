"""Engine 'torchdist': the unchanged algorithms on torch.distributed ranks (launched with torchrun).

n logical nodes are placed on P ranks (n ≥ P) in contiguous blocks; each rank
runs the simulator's algorithm code on its block. ``aggregate`` is an all-reduce
of the local weighted sum (the federated server is this reduction: every rank
applies the same server step to the same θ). ``mix`` sends every neighbouring
rank one flat buffer holding exactly the rows its W_t rows need, with all
receives and sends posted before any wait, then forms the local rows of W_t @ X. Compressed messages travel as
their byte payloads: ``exchange`` (gossip without the mixing) and ``gather_rows`` (uploads, one broadcast per
rank), since a sum of compressed payloads is not one.
Centralized runs identically on every rank (it communicates nothing).

Rank 0 alone evaluates and writes; a round starts with a heartbeat
(``monitored_barrier`` on gloo) so a dead or hung rank fails the job within
``engine.timeout_s``, naming the rank.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from datetime import timedelta
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from distdpo import build, faults
from distdpo.config import Config, ConfigError
from distdpo.engines.loop import RoundHooks, train_rounds
from distdpo.topology import Topology

# ---------------------------------------------------------------- process group


class Terminated(KeyboardInterrupt):
    """SIGTERM (torchrun tearing the job down): leave quietly with 143, like Ctrl-C leaves with 130."""

    exit_code = 143


def _on_sigterm(signum, frame):
    raise Terminated()


class CommError(RuntimeError):
    """A torch.distributed operation failed (a peer died or timed out), as opposed to an error in local compute."""


@contextlib.contextmanager
def network():
    try:
        yield
    except RuntimeError as e:
        raise CommError(str(e)) from e


def backend(cfg: Config) -> str:
    if cfg.engine.backend != "auto":
        return cfg.engine.backend
    return "nccl" if build.device(cfg).type == "cuda" else "gloo"


def init(cfg: Config) -> None:
    """Join the process group torchrun set up (env://), or form a world of one outside torchrun. Idempotent.

    A process group the caller initialized already is used as it is.
    """
    global _CONTROL
    timeout = timedelta(seconds=cfg.engine.timeout_s)
    if not dist.is_initialized():
        name = backend(cfg)
        if name == "nccl" and not torch.cuda.is_available():
            raise ConfigError("engine.backend = 'nccl' needs CUDA; use 'gloo' (or 'auto') on CPU")
        if "RANK" in os.environ:
            if name == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group(name, timeout=timeout)
        else:
            dist.init_process_group(name, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        signal.signal(signal.SIGTERM, _on_sigterm)
    if _CONTROL is None:
        # Heartbeats, broadcasts and metric gathers go over gloo even when the data moves over NCCL.
        group = dist.new_group(backend="gloo", timeout=timeout) if dist.get_backend() == "nccl" else None
        _CONTROL = Control(group, cfg.engine.timeout_s)


def shutdown() -> None:
    global _CONTROL
    _CONTROL = None
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 — a broken group after a rank failure: nothing left to release
            pass


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def agree(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (e.g. the default run directory, which has a timestamp)."""
    return _CONTROL.broadcast(value) if dist.is_initialized() else value


def on_rank0(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only (reading the run directory); every rank gets its result or raises its error."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return fn()
    result: tuple[bool, Any] = (True, None)
    if dist.get_rank() == 0:
        try:
            result = (True, fn())
        except Exception as e:  # noqa: BLE001 — re-raised on every rank below
            result = (False, e)
    ok, value = _CONTROL.broadcast(result)
    if not ok:
        raise value
    return value


class Control:
    """Heartbeats and small control messages between the ranks of one job (a :class:`checkpoint.Sync`)."""

    def __init__(self, group, timeout_s: float):
        self.group, self.timeout_s = group, timeout_s
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.gloo = dist.get_backend(group) == "gloo"

    def heartbeat(self, timeout_s: float | None = None) -> None:
        """Every rank must arrive within the timeout; on gloo rank 0's error names the ranks that did not."""
        if self.world_size == 1:
            return
        timeout = timedelta(seconds=timeout_s or self.timeout_s)
        with network():
            if self.gloo:
                dist.monitored_barrier(self.group, timeout=timeout, wait_all_ranks=True)
            else:
                dist.barrier(self.group)

    barrier = heartbeat

    def broadcast(self, obj: Any) -> Any:
        box = [obj]
        with network():
            dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def check(self, error: str | None) -> None:
        errors = [None] * self.world_size
        with network():
            dist.all_gather_object(errors, error, group=self.group)
        found = [e for e in errors if e]
        if found:
            raise ConfigError("; ".join(found))

    def gather_objects(self, obj: Any) -> list:
        """Every rank's picklable ``obj``, in rank order."""
        out = [None] * self.world_size
        with network():
            dist.all_gather_object(out, obj, group=self.group)
        return out

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """``[world_size, *t.shape]``: every rank's ``t`` (CPU, float64)."""
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        with network():
            dist.all_gather(out, t, group=self.group)
        return torch.stack(out)

    def failure(self, round_index: int, error: BaseException, grace_s: float = 3.0) -> faults.RankFailure | None:
        """Which ranks stopped responding: each survivor reports to the store; those that do not are named."""
        store = dist.distributed_c10d._get_default_store()
        me = f"distdpo/alive/{self.rank}"
        missing = list(range(self.world_size))
        try:
            store.set(me, str(round_index))
            deadline = time.monotonic() + min(grace_s, self.timeout_s)
            while True:
                missing = [q for q in range(self.world_size) if not store.check([f"distdpo/alive/{q}"])]
                if not missing or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        except Exception:  # noqa: BLE001 — the store itself went away (rank 0 died: it hosts it)
            missing = [0] if self.rank != 0 else missing
        if not missing:
            return None  # every rank is alive and saw the error: not a lost rank
        who = ", ".join(map(str, missing))
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return faults.RankFailure(
            f"torchdist: rank {who} stopped responding at round {round_index} (dead, or silent for more than "
            f"engine.timeout_s = {self.timeout_s:g} s); reported by rank {self.rank}: {first}"
        )


_CONTROL: Control | None = None


# ---------------------------------------------------------------- placement and communication


def block(num_nodes: int, world_size: int, r: int) -> range:
    """Rank r's contiguous node rows; block sizes differ by at most one (the first n mod P ranks get one more)."""
    base, extra = divmod(num_nodes, world_size)
    start = r * base + min(r, extra)
    return range(start, start + base + (r < extra))


class TorchDistCommunicator:
    """``aggregate`` = all-reduce; ``mix`` = neighbour exchange of exactly the needed rows. Counts time and bytes."""

    def __init__(
        self, num_nodes: int, topology: Topology | None, *, dtype: torch.dtype, device: torch.device, group=None
    ):
        self.num_nodes, self.topology, self.dtype, self.device, self.group = num_nodes, topology, dtype, device, group
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.blocks = [block(num_nodes, self.world_size, r) for r in range(self.world_size)]
        mine = self.blocks[self.rank]
        self.local_nodes = torch.arange(mine.start, mine.stop)
        self._plans: dict[int, tuple] = {}
        self.comm_time_s, self.bytes_sent = 0.0, 0

    def reset_counters(self) -> None:
        self.comm_time_s, self.bytes_sent = 0.0, 0

    def aggregate(self, values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        local = weights.to(values.dtype) @ values  # [p]; zeros when this rank holds no participating row
        t0 = time.perf_counter()
        if self.world_size > 1:
            with network():
                dist.all_reduce(local, group=self.group)
        self.comm_time_s += time.perf_counter() - t0
        self.bytes_sent += local.numel() * local.element_size()
        return local

    def _plan(self, round_index: int):
        """For W_t: local W rows over the needed columns, where each rank's rows sit among those columns, sends.

        Needed columns are kept in ascending global order (W_loc @ X sums in the simulator's order); blocks are
        contiguous ranges, so the rows from each rank fill one contiguous slice and are received in place.
        """
        period = len(self.topology.schedule) if self.topology.schedule else 1
        key = round_index % period
        if key not in self._plans:
            W = self.topology.matrix(round_index)
            mine = self.blocks[self.rank]
            rows = W[mine.start : mine.stop]
            needed = set(np.flatnonzero((rows != 0).any(0)).tolist()) | set(mine)
            cols = sorted(needed)
            recv, send, local = [], [], None
            for q, other in enumerate(self.blocks):
                at = [k for k, j in enumerate(cols) if j in other]
                if q == self.rank:
                    local = (at[0], at[-1] + 1)
                    continue
                if at:
                    recv.append((q, at[0], at[-1] + 1))
                # Rows of mine that q's W rows touch: q computes the same list as its receive from me.
                out = np.flatnonzero((W[other.start : other.stop, mine.start : mine.stop] != 0).any(0))
                if len(out):
                    contiguous = out[-1] - out[0] + 1 == len(out)
                    send.append(
                        (
                            q,
                            slice(int(out[0]), int(out[-1]) + 1)
                            if contiguous
                            else torch.as_tensor(out, dtype=torch.long, device=self.device),
                        )
                    )
            W_loc = torch.as_tensor(rows[:, cols], dtype=self.dtype, device=self.device)
            self._plans[key] = (W_loc, torch.as_tensor(cols), local, recv, send)
        return self._plans[key]

    def mix(self, values: torch.Tensor, round_index: int) -> torch.Tensor:
        return self._plan(round_index)[0] @ self.exchange(values, round_index)

    def neighbourhood(self, round_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        W_loc, cols, *_ = self._plan(round_index)
        return cols, W_loc

    def exchange(self, values: torch.Tensor, round_index: int) -> torch.Tensor:
        if self.topology is None:
            raise RuntimeError("gossip needs a topology: this run has none (is the algorithm decentralized?)")
        _, cols, (lo, hi), recv, send = self._plan(round_index)
        X = values.new_empty(len(cols), values.shape[1])
        X[lo:hi] = values
        t0 = time.perf_counter()
        with network():
            # Post every receive and send before waiting on any: no pair of ranks can block each other.
            works = [dist.irecv(X[a:b].view(-1), q, group=self.group) for q, a, b in recv]
            for q, rows in send:
                msg = (values[rows] if isinstance(rows, slice) else values.index_select(0, rows)).reshape(-1)
                works.append(dist.isend(msg, q, group=self.group))
                self.bytes_sent += msg.numel() * msg.element_size()
            for w in works:
                w.wait()
        self.comm_time_s += time.perf_counter() - t0
        return X

    def gather_rows(self, values: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
        """One broadcast per rank holding some of ``nodes``: exactly each rank's rows travel (no padding)."""
        out = values.new_empty(len(nodes), *values.shape[1:])
        t0 = time.perf_counter()
        with network():
            at = 0
            for q, b in enumerate(self.blocks):
                count = int(((nodes >= b.start) & (nodes < b.stop)).sum())
                part = out[at : at + count]
                if q == self.rank:
                    part.copy_(values)
                    self.bytes_sent += values.numel() * values.element_size()
                if count and self.world_size > 1:
                    dist.broadcast(part, q, group=self.group)
                at += count
        self.comm_time_s += time.perf_counter() - t0
        return out


# ---------------------------------------------------------------- the engine


class _RankHooks(RoundHooks):
    """A rank's part around each round: fault injection, the heartbeat, and the per-rank communication columns."""

    def __init__(self, ctl: Control, comm: TorchDistCommunicator, federated=None, weights=None):
        self.ctl, self.comm, self.rank, self.round = ctl, comm, ctl.rank, 0
        self.pending = torch.zeros(2, dtype=torch.float64)  # comm seconds and bytes since the last row
        self.federated, self.weights = federated, weights  # per-site data: every rank takes part in evaluation

    def measure_elsewhere(self, theta: torch.Tensor) -> None:
        if self.federated is not None:
            self.federated.evaluate(theta, self.weights)

    def before_round(self, round_index: int) -> None:
        self.round = round_index
        faults.inject(self.rank, round_index)
        self.ctl.heartbeat()
        self.comm.reset_counters()

    def after_round(self, stats: dict[str, float]) -> None:
        self.pending += torch.tensor([self.comm.comm_time_s, float(self.comm.bytes_sent)], dtype=torch.float64)

    def row_stats(self, stats: dict[str, float]) -> dict[str, float]:
        per_rank = self.ctl.gather(self.pending)
        self.pending = torch.zeros(2, dtype=torch.float64)
        P = self.ctl.world_size
        return {
            **stats,
            **{f"comm_time_s/rank{q}": float(per_rank[q, 0]) for q in range(P)},
            **{f"comm_bytes/rank{q}": int(per_rank[q, 1]) for q in range(P)},
        }

    def stop_everywhere(self, diverged: bool) -> bool:
        return bool(self.ctl.broadcast(diverged))  # rank 0 evaluates; its word holds on every rank

    def checkpoint_extra(self) -> dict[str, torch.Tensor]:
        return {"pending_comm": self.pending}

    def restore_extra(self, extra: dict[str, torch.Tensor]) -> None:
        self.pending = extra.get("pending_comm", self.pending)


def site_task(cfg: Config, ctl: Control):
    """This rank's clients' task from their own files only (data.source = "local"), measured with every rank's."""
    from distdpo.data.sites import local_split, site_files
    from distdpo.tasks.evaluation import FederatedTask

    n = len(site_files(cfg))
    if n < ctl.world_size:
        raise ConfigError(f"engine.name = 'torchdist' places {n} sites on {ctl.world_size} ranks: needs sites ≥ ranks")
    mine = list(block(n, ctl.world_size, ctl.rank))
    split, error = None, None
    try:
        split = local_split(cfg, held=mine)
    except ConfigError as e:
        error = f"rank {ctl.rank}: {e}"
    ctl.check(error)  # a site's bad file stops every rank, named
    sizes = torch.zeros(n, dtype=torch.float64)
    sizes[mine] = torch.tensor([len(split.train[i]) for i in mine], dtype=torch.float64)
    every = ctl.gather(sizes).sum(0).long().tolist()  # each site's training-pair count: the batches need them
    task = build.build_text_task(cfg, split, every)
    federated = FederatedTask(task, ctl.gather_objects)
    federated.files_by_rank = ctl.gather_objects(split.files)  # which files each rank opened (summary.json)
    return federated


def run(cfg: Config, label: str, cache, *, progress: bool = True):
    """Train one configuration on this job's ranks; rank 0 returns (metric rows, summary), others ([], {})."""
    from distdpo.checkpoint import RunCheckpoint
    from distdpo.metrics import Recorder

    init(cfg)
    ctl = _CONTROL
    me, P = ctl.rank, ctl.world_size
    federated = None
    if build.data_stays_at_sites(cfg):
        federated = cache.tasks[build.task_key(cfg)] = site_task(cfg, ctl)  # what the run directory asks of it
        cache.fingerprints[build.task_key(cfg)] = federated.fingerprint()
    task = federated or cache.task(cfg)
    if task.num_clients < P:
        raise ConfigError(
            f"engine.name = 'torchdist' places {task.num_clients} nodes on {P} ranks: needs nodes ≥ ranks"
        )
    weights = build.client_weights(cfg, task.client_sizes)
    topology = build.build_topology(cfg, task.num_clients)
    comm = TorchDistCommunicator(task.num_clients, topology, dtype=build.torch_dtype(cfg), device=build.device(cfg))
    algo = build.build_algorithm(cfg, task, comm, topology, weights)
    columns = [f"comm_time_s/rank{q}" for q in range(P)] + [f"comm_bytes/rank{q}" for q in range(P)]
    rec = None
    if me == 0:  # f★ (a Newton solve) and evaluation happen on rank 0 only
        optimum = None if federated else cache.optimum(cfg, task, weights)
        rec = Recorder(cfg, label, task, weights, topology, optimum, extra_columns=columns)
    ckpt = RunCheckpoint(cfg, label, ctl, fingerprint=task.fingerprint() if federated else cache.fingerprint(cfg))
    hooks = _RankHooks(ctl, comm, federated, weights)
    try:
        ctl.heartbeat(max(ctl.timeout_s, 600.0))  # setup: rank 0 may spend a while on f★
        theta = train_rounds(cfg, label, algo, rec, ckpt, hooks, progress=progress, device=comm.device)
    except CommError as e:
        if P == 1:
            raise
        failure = ctl.failure(hooks.round, e)
        if failure is None:
            raise
        raise failure from None
    if rec is None:
        if federated is not None:
            federated.grad_noise(theta)  # this rank's part of the summary's σ²
        return [], {}
    summary = rec.summary(theta)
    summary["torchdist"] = {
        "world_size": P,
        "backend": backend(cfg),
        "placement": [[b.start, b.stop] for b in comm.blocks],
    }
    if federated is not None:
        summary["torchdist"]["files_read"] = federated.files_by_rank
    return rec.rows, summary
