"""torchdist on loopback (P = 2 ranks, gloo): per-round compute vs communication, and overhead over the simulator.

1. Parameter vectors of 10^3 … 10^7 floats, 4 nodes on a ring (2 rows per rank):
   per round, the local compute (one SGD step on every local row, plus the local
   W @ X of gossip) and the communication of gossip (neighbour exchange, the
   TorchDistCommunicator's ``mix``) and of all-reduce aggregation (``aggregate``).
2. The same FedAvg-DPO and DSGD configs trained by the simulator (one process)
   and by the torchdist engine (2 processes): ratio of training wall times.

Medians over repeats; the last line is ``overhead: <torchdist / simulator>x``.
Run: ``.venv/bin/python benchmarks/bench_torchdist.py [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SIZES = [10**3, 10**4, 10**5, 10**6, 10**7]
OVERHEAD_CONFIG = {
    "seed": 0,
    "data": {"num_clients": 16, "pairs_per_client": 200, "eval_pairs_per_client": 50, "dim": 16, "num_actions": 8},
    "algorithm": {"rounds": 30, "local_steps": 5, "lr": 0.5, "batch_size": 32},
    "topology": {"graph": "ring"},
    "engine": {"progress": False, "eval_every": 30},
}
ALGORITHMS = ["fedavg", "dsgd"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reps(p: int, quick: bool) -> int:
    base = 30 if p <= 10**5 else (10 if p <= 10**6 else 4)
    return max(3, base // 3) if quick else base


def _micro(rank: int, quick: bool, results) -> None:
    from distdpo.engines.torchdist import TorchDistCommunicator
    from distdpo.topology import make_topology

    topo = make_topology("ring", 4)
    for p in SIZES:
        comm = TorchDistCommunicator(4, topo, dtype=torch.float32, device=torch.device("cpu"))
        gen = torch.Generator().manual_seed(rank)
        X = torch.randn(len(comm.local_nodes), p, generator=gen)
        target = torch.randn(len(comm.local_nodes), p, generator=gen)
        w = torch.full((len(comm.local_nodes),), 0.25)
        rec = {"compute": [], "gossip": [], "allreduce": [], "gossip_bytes": 0, "allreduce_bytes": 0}
        comm.mix(X, 0), comm.aggregate(X, w)  # warm-up: plans, connections, allocations
        for _ in range(_reps(p, quick)):
            dist.barrier()
            t0 = time.perf_counter()
            X = X - 0.1 * (X - target)  # one local SGD step on a quadratic, every local row
            compute = time.perf_counter() - t0
            comm.reset_counters()
            t0 = time.perf_counter()
            X = comm.mix(X, 0)
            gossip_total = time.perf_counter() - t0
            rec["gossip"].append(comm.comm_time_s)
            rec["gossip_bytes"] = comm.bytes_sent
            rec["compute"].append(compute + gossip_total - comm.comm_time_s)  # + the local W @ X
            comm.reset_counters()
            dist.barrier()
            comm.aggregate(X, w)
            rec["allreduce"].append(comm.comm_time_s)
            rec["allreduce_bytes"] = comm.bytes_sent
        if rank == 0:
            results[p] = {k: (statistics.median(v) if isinstance(v, list) else v) for k, v in rec.items()}


def _overhead(rank: int, repeats: int, results) -> None:
    from distdpo.config import from_dict
    from distdpo.experiment import Cache, run_one

    cache = Cache()
    for name in ALGORITHMS:
        cfg = from_dict(
            {
                **OVERHEAD_CONFIG,
                "algorithm": {**OVERHEAD_CONFIG["algorithm"], "name": name},
                "engine": {**OVERHEAD_CONFIG["engine"], "name": "torchdist"},
            }
        )
        walls = []
        for _ in range(repeats):
            _, summary = run_one(cfg, name, cache, progress=False)
            if rank == 0:
                walls.append(summary["final"]["wall_time_s"])
        if rank == 0:
            results[name] = (statistics.median(walls), summary["final"]["global_loss"])


def _worker(rank: int, world: int, port: int, quick: bool, repeats: int, results) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    dist.init_process_group("gloo", timeout=timedelta(seconds=300))
    try:
        _micro(rank, quick, results["micro"])
        _overhead(rank, repeats, results["overhead"])  # the engine joins this process group as it is
    finally:
        dist.destroy_process_group()


def _simulator(repeats: int) -> dict:
    from distdpo.config import from_dict
    from distdpo.experiment import Cache, run_one

    torch.set_num_threads(1)
    cache, out = Cache(), {}
    for name in ALGORITHMS:
        cfg = from_dict({**OVERHEAD_CONFIG, "algorithm": {**OVERHEAD_CONFIG["algorithm"], "name": name}})
        walls = []
        for _ in range(repeats):
            _, summary = run_one(cfg, name, cache, progress=False)
            walls.append(summary["final"]["wall_time_s"])
        out[name] = (statistics.median(walls), summary["final"]["global_loss"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    args = parser.parse_args()
    repeats = 2 if args.quick else 5
    print(
        f"torch {torch.__version__}; python {platform.python_version()}; {platform.machine()} "
        f"{platform.processor() or ''}; {os.cpu_count()} CPUs; P = 2 ranks, gloo on 127.0.0.1; 1 thread per process"
    )
    manager = mp.Manager()
    results = {"micro": manager.dict(), "overhead": manager.dict()}
    mp.spawn(_worker, args=(2, _free_port(), args.quick, repeats, results), nprocs=2, join=True)
    micro = dict(results["micro"])

    print("\nper round, median (ring of 4 nodes, 2 rows per rank; all-reduce of one p-vector)")
    print(
        f"{'floats p':>10}  {'compute ms':>10}  {'gossip ms':>10}  {'gossip MB/rank':>14}  "
        f"{'allreduce ms':>12}  {'allreduce MB':>12}  {'comm share (gossip)':>19}"
    )
    for p in SIZES:
        m = micro[p]
        share = m["gossip"] / (m["gossip"] + m["compute"])
        print(
            f"{p:>10}  {m['compute'] * 1e3:>10.3f}  {m['gossip'] * 1e3:>10.3f}  {m['gossip_bytes'] / 1e6:>14.3f}  "
            f"{m['allreduce'] * 1e3:>12.3f}  {m['allreduce_bytes'] / 1e6:>12.3f}  {share:>19.1%}"
        )

    sim = _simulator(repeats)
    td = dict(results["overhead"])
    print(
        f"\nsame work in both engines: n = 16 clients, d = 16, K = 5, batch 32, 30 rounds; median of {repeats} "
        "(training wall time, evaluation excluded)"
    )
    print(
        f"{'algorithm':>10}  {'simulator s':>12}  {'torchdist s':>12}  {'ratio':>7}  {'loss sim':>10}  {'loss td':>10}"
    )
    for name in ALGORITHMS:
        (s, ls), (t, lt) = sim[name], td[name]
        print(f"{name:>10}  {s:>12.4f}  {t:>12.4f}  {t / s:>6.2f}x  {ls:>10.6f}  {lt:>10.6f}")
    total = sum(td[n][0] for n in ALGORITHMS) / sum(sim[n][0] for n in ALGORITHMS)
    print(f"overhead: {total:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
