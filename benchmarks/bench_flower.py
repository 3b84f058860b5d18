"""Per-round wall time of Flower's simulation engine vs distdpo's simulator on the same FedAvg-DPO job.

Both runs use one config (only engine.name differs) and are timed in this one
process, one after the other; "per round" is the recorder's training wall time
(evaluation excluded) divided by the rounds. Flower's startup (Ray, actors,
partition discovery) is reported separately. The last line is ``ratio: <x>x``
(Flower's time per round / the simulator's).

    python benchmarks/bench_flower.py [--clients 8] [--rounds 10] [--local-steps 10] [--dim 16]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from distdpo.config import from_dict
from distdpo.experiment import Cache, run_one


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--dim", type=int, default=16)
    args = ap.parse_args()
    table = {
        "seed": 0,
        "data": {"num_clients": args.clients, "pairs_per_client": 200, "dim": args.dim, "num_actions": 8},
        "algorithm": {
            "name": "fedavg",
            "rounds": args.rounds,
            "local_steps": args.local_steps,
            "lr": 0.5,
            "batch_size": 32,
        },
        "engine": {"progress": False},
    }
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; job: FedAvg-DPO, n={args.clients}, d={args.dim}, "
        f"K={args.local_steps}, B=32, R={args.rounds}, all clients every round"
    )
    run_one(from_dict(table, [("algorithm.rounds", 1)]), "warmup", Cache(), progress=False)  # first-call costs
    results = {}
    for engine in ("simulation", "flower"):
        cfg = from_dict(table, [("engine.name", engine)])
        t0 = time.perf_counter()
        rows, _ = run_one(cfg, "run", Cache(), progress=False)
        total = time.perf_counter() - t0
        per_round = rows[-1]["wall_time_s"] / args.rounds
        results[engine] = (per_round, total, rows[-1]["global_loss"])
        print(
            f"{engine:>10}: {per_round * 1e3:9.2f} ms/round   total {total:7.2f} s (incl. setup and evaluation)   "
            f"final loss {rows[-1]['global_loss']:.6f}"
        )
    (sim, _, loss_sim), (fl, _, loss_fl) = results["simulation"], results["flower"]
    print(f"final loss relative difference: {abs(loss_fl - loss_sim) / abs(loss_sim):.2e}")
    print(f"ratio: {fl / sim:.1f}x")


if __name__ == "__main__":
    main()
