"""Simulator vs. a per-client Python loop on the same FedAvg-DPO and DSGD workload.

Both ways train the same synthetic log-linear DPO task (default: 1,000 clients,
d = 64, K = 10 local SGD steps of batch 32) on the CPU in float32:

1. **simulator** — distdpo's own ``Federated`` / ``Decentralized`` algorithms,
   built from a ``Config`` with ``distdpo.build`` and a ``SimulatedCommunicator``:
   every client's parameters are one row of a tensor and a round is a handful of
   batched tensor ops.
2. **per-client loop** — what a straightforward implementation does: every client
   owns a parameter tensor (``requires_grad``), a Python loop over clients and over
   local steps computes that client's DPO loss on its minibatch, calls
   ``backward()`` and takes an in-place SGD step; then FedAvg averages the client
   updates (weighted by client size) or DSGD gossips over a ring with Metropolis
   weights, one node at a time from its neighbours' rows (adapt-then-combine).

The loop consumes exactly the simulator's minibatches (same generator, same
draw sequence), so after R rounds both ways must hold the same models; the
benchmark checks that (``torch.allclose``, rtol 1e-4, atol 1e-5) and exits
non-zero if they differ. It then reports the median per-round time of each way
and the overall speedup (loop time / simulator time, FedAvg + DSGD).

    python benchmarks/bench_simulator.py [--clients 1000 --rounds 3 --repeats 3 ...]

The last line printed is ``speedup: <x>x``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings

import torch

from distdpo import build
from distdpo.config import from_dict
from distdpo.engines.simulation import SimulatedCommunicator
from distdpo.losses import margin_loss
from distdpo.topology import make_topology

RTOL, ATOL = 1e-4, 1e-5


# ---------------------------------------------------------------------------- setup


def make_config(args: argparse.Namespace, algorithm: str):
    return from_dict(
        {
            "seed": args.seed,
            "data": {
                "num_clients": args.clients,
                "pairs_per_client": args.pairs_per_client,
                "eval_pairs_per_client": 2,  # held-out pairs are never touched here; keep them small
                "dim": args.dim,
                "num_actions": args.num_actions,
                "size_skew": args.size_skew,
            },
            "policy": {"kind": "loglinear", "beta": args.beta, "loss_type": "sigmoid"},
            "algorithm": {
                "name": algorithm,
                "rounds": args.rounds,
                "local_steps": args.local_steps,
                "lr": args.lr,
                "batch_size": args.batch_size,
                "optimizer": "sgd",
                "clients_per_round": 0,
                "server_lr": 1.0,
                "gossip": "atc",
            },
            "topology": {"graph": "ring", "weights": "metropolis"},
            "engine": {"device": "cpu", "dtype": "float32", "progress": False},
        }
    )


def build_simulator(cfg, task):
    """The simulator's algorithm object, exactly as ``distdpo.experiment.run_one`` builds it."""
    weights = build.client_weights(cfg, task.client_sizes)
    topology = build.build_topology(cfg)
    comm = SimulatedCommunicator(task.num_clients, topology, dtype=build.torch_dtype(cfg), device=build.device(cfg))
    return build.build_algorithm(cfg, task, comm, topology, weights)


class Client:
    """One client of the per-client loop: its own pairs (the policy's per-pair inputs and the
    reference log-odds), as any per-client FL code would hold them."""

    __slots__ = ("pairs", "ref")

    def __init__(self, task, i: int):
        n, N = task.weight.shape
        self.pairs = task.pairs_flat.reshape(n, N, *task.pairs_flat.shape[1:])[i].clone()
        self.ref = task.ref_log_odds_flat.reshape(n, N)[i].clone()


# ------------------------------------------------------------------ per-client loop


class LoopCommon:
    def __init__(self, task, cfg):
        a = cfg.algorithm
        self.task, self.policy = task, task.policy
        self.beta, self.loss_type, self.label_smoothing = task.beta, task.loss_type, task.label_smoothing
        self.K, self.lr, self.B = a.local_steps, a.lr, int(a.batch_size)
        self.clients = [Client(task, i) for i in range(task.num_clients)]
        self.data_gen = torch.Generator().manual_seed(cfg.seed + 1)  # as Federated/Decentralized.__init__

    def draw_batches(self):
        # The simulator draws, per local step, one batch for all n clients; draw the same K batches.
        return [self.task.sample_batch(self.data_gen, self.B) for _ in range(self.K)]

    def train_client(self, i: int, theta: torch.Tensor, batches) -> torch.Tensor:
        """K local SGD steps of client i from ``theta``, with autograd on its own parameter tensor."""
        c = self.clients[i]
        th = theta.detach().clone().requires_grad_(True)
        for batch in batches:
            idx, scale = batch.index[i], batch.scale[i]
            h = self.policy.log_odds(th[None], c.pairs[idx][None])[0] - c.ref[idx]
            loss = (margin_loss(h, self.beta, self.loss_type, self.label_smoothing) * scale).sum()
            loss.backward()
            with torch.no_grad():
                th -= self.lr * th.grad
            th.grad = None
        return th.detach()


class LoopFedAvg(LoopCommon):
    """FedAvg, full participation: every client runs K steps from θ; θ += η_g Σ p_i (θ_i − θ)."""

    def __init__(self, task, cfg):
        super().__init__(task, cfg)
        sizes = task.client_sizes.tolist()
        total = sum(sizes)
        self.p = [s / total for s in sizes]
        self.server_lr = cfg.algorithm.server_lr
        self.theta = task.initial_params().clone()

    def run_round(self) -> None:
        batches = self.draw_batches()
        update = torch.zeros_like(self.theta)
        for i in range(len(self.clients)):
            theta_i = self.train_client(i, self.theta, batches)
            update += self.p[i] * (theta_i - self.theta)
        self.theta = self.theta + self.server_lr * update


class LoopDSGD(LoopCommon):
    """DSGD, adapt-then-combine: each node runs K steps, then x_i ← Σ_j W_ij z_j over its ring neighbours."""

    def __init__(self, task, cfg, W):
        super().__init__(task, cfg)
        self.mixing = [[(int(j), float(W[i, j])) for j in W[i].nonzero()[0]] for i in range(W.shape[0])]
        theta0 = task.initial_params()
        self.x = [theta0.clone() for _ in range(task.num_clients)]

    def run_round(self) -> None:
        batches = self.draw_batches()
        z = [self.train_client(i, self.x[i], batches) for i in range(len(self.clients))]
        new = []
        for row in self.mixing:  # node i gossips with its neighbours only
            acc = None
            for j, w in row:
                acc = w * z[j] if acc is None else acc.add_(z[j], alpha=w)
            new.append(acc)
        self.x = new

    @property
    def X(self) -> torch.Tensor:
        return torch.stack(self.x)


# ------------------------------------------------------------------------- timing


def timed_rounds(obj, rounds: int, sim: bool) -> float:
    """Seconds per round over ``rounds`` rounds."""
    t0 = time.perf_counter()
    for r in range(rounds):
        obj.run_round(r) if sim else obj.run_round()
    return (time.perf_counter() - t0) / rounds


def compare(name: str, sim_out: torch.Tensor, loop_out: torch.Tensor) -> None:
    if sim_out.shape != loop_out.shape or not torch.allclose(sim_out, loop_out, rtol=RTOL, atol=ATOL):
        diff = (sim_out - loop_out).abs().max().item() if sim_out.shape == loop_out.shape else float("nan")
        print(
            f"MISMATCH ({name}): simulator and per-client loop disagree after the same rounds "
            f"(shapes {tuple(sim_out.shape)} vs {tuple(loop_out.shape)}, max |diff| = {diff:.3g}, "
            f"rtol={RTOL}, atol={ATOL})",
            file=sys.stderr,
        )
        sys.exit(1)


def bench(name: str, cfg, task, make_loop, final_sim, final_loop, args) -> tuple[list[float], list[float], float]:
    sim_times, loop_times, max_diff = [], [], 0.0
    loop_rounds = args.loop_rounds or args.rounds
    for rep in range(args.repeats):
        algo = build_simulator(cfg, task)
        sim_times.append(timed_rounds(algo, args.rounds, sim=True))
        loop = make_loop()
        if rep == 0 and loop_rounds != args.rounds:
            # Correctness on the full R rounds once; the timed loop runs use loop_rounds rounds.
            timed_rounds(loop, args.rounds, sim=False)
            compare(name, final_sim(algo), final_loop(loop))
            max_diff = max(max_diff, (final_sim(algo) - final_loop(loop)).abs().max().item())
            loop = make_loop()
        loop_times.append(timed_rounds(loop, loop_rounds, sim=False))
        if loop_rounds == args.rounds:
            compare(name, final_sim(algo), final_loop(loop))
            max_diff = max(max_diff, (final_sim(algo) - final_loop(loop)).abs().max().item())
        print(
            f"  {name} repeat {rep + 1}/{args.repeats}: simulator {sim_times[-1] * 1e3:9.2f} ms/round, "
            f"loop {loop_times[-1] * 1e3:9.1f} ms/round",
            flush=True,
        )
    return sim_times, loop_times, max_diff


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="rounds per timed repeat (and for the equality check)")
    ap.add_argument(
        "--loop-rounds",
        type=int,
        default=0,
        help="time the loop on this many rounds per repeat (0 = --rounds); the check always uses --rounds",
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pairs-per-client", type=int, default=64)
    ap.add_argument("--num-actions", type=int, default=4)
    ap.add_argument("--size-skew", type=float, default=0.0, help="log-normal σ of client sizes (0 = equal)")
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")  # the ring's W @ X

    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"cpu {platform.processor() or platform.machine()} x{os.cpu_count()}, python {platform.python_version()}"
    )
    print(
        f"workload: {args.clients} clients, d={args.dim}, K={args.local_steps}, batch {args.batch_size}, "
        f"{args.pairs_per_client} pairs/client, {args.num_actions} actions, log-linear policy, SGD lr {args.lr}, "
        f"float32, {args.rounds} rounds x {args.repeats} repeats",
        flush=True,
    )

    t0 = time.perf_counter()
    fed_cfg, dsgd_cfg = make_config(args, "fedavg"), make_config(args, "dsgd")
    assert build.task_key(fed_cfg) == build.task_key(dsgd_cfg)
    task = build.build_task(fed_cfg)  # shared by both algorithms and both ways
    W = make_topology("ring", args.clients).W
    print(f"setup (data, task): {time.perf_counter() - t0:.1f} s", flush=True)

    fed = bench(
        "fedavg", fed_cfg, task, lambda: LoopFedAvg(task, fed_cfg), lambda a: a.global_params(), lambda l: l.theta, args
    )
    dsgd = bench("dsgd", dsgd_cfg, task, lambda: LoopDSGD(task, dsgd_cfg, W), lambda a: a.X, lambda l: l.X, args)
    print(
        f"check: final models agree (torch.allclose rtol={RTOL}, atol={ATOL}); "
        f"max |diff| fedavg {fed[2]:.2e}, dsgd {dsgd[2]:.2e}"
    )

    med = {
        (way, alg): statistics.median(times)
        for alg, res in (("fedavg", fed), ("dsgd", dsgd))
        for way, times in (("simulator", res[0]), ("loop", res[1]))
    }
    print()
    print(f"{'way':<18}{'fedavg s/round':>16}{'dsgd s/round':>16}{'total s/round':>16}")
    for way in ("simulator", "loop"):
        f, d = med[(way, "fedavg")], med[(way, "dsgd")]
        label = "simulator" if way == "simulator" else "per-client loop"
        print(f"{label:<18}{f:>16.4f}{d:>16.4f}{f + d:>16.4f}")
    rf = med[("loop", "fedavg")] / med[("simulator", "fedavg")]
    rd = med[("loop", "dsgd")] / med[("simulator", "dsgd")]
    total_sim = med[("simulator", "fedavg")] + med[("simulator", "dsgd")]
    total_loop = med[("loop", "fedavg")] + med[("loop", "dsgd")]
    speedup = total_loop / total_sim
    print(f"{'ratio (loop/sim)':<18}{rf:>15.1f}x{rd:>15.1f}x{speedup:>15.1f}x")
    print(
        f"(medians over {args.repeats} repeats of {args.rounds} rounds"
        + (f"; loop timed on {args.loop_rounds} rounds" if args.loop_rounds and args.loop_rounds != args.rounds else "")
        + ")"
    )
    print(f"speedup: {speedup:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
