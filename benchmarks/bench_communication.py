"""Bytes to a fixed target: compressed messages against uncompressed ones, same task, same target.

1. **synthetic** — the log-linear DPO task, n = 64 clients on a ring (Metropolis weights), d = 32, 100 pairs a
   client, heterogeneity 0.5, full-batch gradients, K = 1, η = 0.2, float32. Every method runs until the
   optimality gap f(θ̄) − f★ (f★ from the Newton solver) is at most ``--target`` (checked every round) and
   reports the bytes it sent by then, counted as ``bytes_communicated`` counts them (compressed payloads:
   values, indices, scales). Methods: uncompressed DSGD and FedAvg; DSGD with int8 and top-k gossip; CHOCO-SGD
   with top-k, QSGD and int8 at a few consensus steps γ; FedAvg with compressed uploads (the model still goes
   down dense, so uploads alone save at most 2×).
2. **language model** (``--lm``, on by default when the HH-RLHF file is there) — the built-in tiny GPT-2 with
   LoRA (r = 8) on HH-RLHF pairs, 8 clients, AdamW, batch 4, K = 2: bytes until the global loss falls to
   ``--lm-target``, DSGD on a ring against CHOCO, and FedAvg against compressed uploads, against FFA-LoRA
   (``freeze_a``: B alone travels), ``product`` and half the clients at rank 2 (FlexLoRA: ``product`` with
   ``policy.lora_r = [2, 2, 2, 2, 8, 8, 8, 8]``; the split is IID, so a rank by size would be 8 for all).

The last line is ``bytes saved: <ratio>x``: on the synthetic task, the fewest bytes of an uncompressed method
over the fewest bytes of a compressed one (γ picked per compressor by this run: the table shows every γ).

    python benchmarks/bench_communication.py [--target 3e-4] [--no-lm]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from distdpo import build
from distdpo.config import from_dict
from distdpo.engines.simulation import SimulatedCommunicator
from distdpo.experiment import Cache
from distdpo.solver import solve_centralized

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"

SYNTHETIC = [
    {"name": "dsgd"},
    {"name": "fedavg"},
    {"name": "dsgd", "compression": "int8"},
    {"name": "dsgd", "compression": "topk:0.03"},
    *({"name": "choco", "compression": "topk:0.03", "consensus_lr": g} for g in (0.05, 0.2, 0.5)),
    *({"name": "choco", "compression": "qsgd:1", "consensus_lr": g} for g in (0.1, 0.3)),
    {"name": "choco", "compression": "int8", "consensus_lr": 1.0},
    {"name": "fedavg", "compression": "topk:0.03"},
    {"name": "fedavg", "compression": "int8"},
    {"name": "fedavg", "compression": "qsgd:1", "error_feedback": "ef21"},
]
LANGUAGE_MODEL = [
    {"name": "dsgd"},
    {"name": "choco", "compression": "int8", "consensus_lr": 1.0},
    {"name": "choco", "compression": "qsgd:1", "consensus_lr": 0.5},
    {"name": "choco", "compression": "topk:0.05", "consensus_lr": 0.3},
    {"name": "fedavg"},
    {"name": "fedavg", "compression": "int8"},
    {"name": "fedavg", "lora_aggregation": "freeze_a"},
    {"name": "fedavg", "lora_aggregation": "product"},
    {"name": "fedavg", "lora_aggregation": "product", "policy": {"lora_r": [2, 2, 2, 2, 8, 8, 8, 8]}},
]


def synthetic_table(seed: int) -> dict:
    return {
        "seed": seed,
        "data": {
            "num_clients": 64,
            "pairs_per_client": 100,
            "eval_pairs_per_client": 2,
            "dim": 32,
            "heterogeneity": 0.5,
        },
        "algorithm": {"batch_size": "full", "local_steps": 1, "lr": 0.2},
        "engine": {"progress": False},
    }


def lm_table(seed: int, data: Path) -> dict:
    return {
        "seed": seed,
        "data": {"source": str(data), "num_clients": 8, "max_pairs": 400, "loss_pairs_per_client": 8},
        "policy": {
            "kind": "causal_lm",
            "model": "builtin:gpt2-tiny",
            "max_length": 64,
            "lora_r": 8,
            "beta": 0.1,
            "tokenizer_vocab_size": 1024,
        },
        "algorithm": {"local_steps": 2, "batch_size": 4, "lr": 5e-3, "optimizer": "adamw"},
        "engine": {"progress": False},
    }


def label(method: dict) -> str:
    out = method["name"] + (f" {method['compression']}" if "compression" in method else "")
    out += f" γ={method['consensus_lr']}" if "consensus_lr" in method else ""
    out += f" {method['lora_aggregation']}" if "lora_aggregation" in method else ""
    out += " r=" + "/".join(map(str, method["policy"]["lora_r"])) if "policy" in method else ""
    return out + (f" {method['error_feedback']}" if "error_feedback" in method else "")


def reduces_bytes(method: dict) -> bool:
    """Whether the method sends less than the dense adapter (compression, B alone, lower ranks)."""
    return "compression" in method or method.get("lora_aggregation") == "freeze_a" or "policy" in method


def bytes_to_target(table: dict, method: dict, cache: Cache, measure, target: float, max_rounds: int):
    """(bytes, rounds) when ``measure(task, weights, θ̄)`` first falls to ``target``, or (None, last value)."""
    algorithm = {k: v for k, v in method.items() if k != "policy"}
    policy = {**table.get("policy", {}), **method.get("policy", {})}
    cfg = from_dict({**table, "policy": policy, "algorithm": {**table["algorithm"], **algorithm, "rounds": max_rounds}})
    task = cache.task(cfg)  # freeze_a trains B alone: a task of its own
    weights = build.client_weights(cfg, task.client_sizes)
    topology = build.build_topology(cfg, task.num_clients)
    comm = SimulatedCommunicator(task.num_clients, topology, dtype=build.torch_dtype(cfg))
    algo = build.build_algorithm(cfg, task, comm, topology, weights)
    sent, value = 0, float("nan")
    for r in range(max_rounds):
        sent += algo.run_round(r)["bytes"]
        value = measure(task, weights, algo.global_params())
        if value <= target:
            return sent, r + 1
        if not value < 1e6:
            break
    return None, value


def compare(title: str, table: dict, methods: list[dict], cache: Cache, measure, target: float, max_rounds: int):
    print(f"\n{title}")
    print(f"{'method':34s}{'rounds':>8s}{'bytes':>14s}{'saved':>9s}")
    results = {}
    for method in methods:
        t0 = time.perf_counter()
        results[label(method)] = (*bytes_to_target(table, method, cache, measure, target, max_rounds), method)
        sent, rounds, _ = results[label(method)]
        base = fewest(results, compressed=False)
        if sent is None:
            print(f"{label(method):34s}{'—':>8s}{'not reached':>14s}{'':>9s}  (last {rounds:.3g})")
        else:
            saved = f"{base / sent:8.1f}x" if base else f"{'':>9s}"
            print(f"{label(method):34s}{rounds:8d}{sent:14,d}{saved}  ({time.perf_counter() - t0:.1f} s)")
    return results


def fewest(results: dict, compressed: bool) -> float:
    """The fewest bytes to the target among the (un)compressed methods that reached it (nan if none did)."""
    sent = [v[0] for v in results.values() if v[0] is not None and reduces_bytes(v[2]) == compressed]
    return min(sent, default=float("nan"))


def best_ratio(results: dict) -> float:
    return fewest(results, compressed=False) / fewest(results, compressed=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", type=float, default=3e-4, help="optimality gap to reach (synthetic)")
    p.add_argument("--max-rounds", type=int, default=3000)
    p.add_argument("--lm", action=argparse.BooleanOptionalAction, default=HH.is_file())
    p.add_argument("--lm-target", type=float, default=0.66, help="global loss to reach (language model)")
    p.add_argument("--lm-rounds", type=int, default=40)
    p.add_argument("--data", type=Path, default=HH)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()} x{os.cpu_count()}, "
        f"python {platform.python_version()}"
    )
    table = synthetic_table(args.seed)
    cache = Cache()
    cfg = from_dict(table)
    task = cache.task(cfg)
    weights = build.client_weights(cfg, task.client_sizes)
    f_star = solve_centralized(task, weights).f_star
    start = float(task.objective(task.initial_params().to(torch.float64), weights)) - f_star

    def gap(task, weights: torch.Tensor, theta: torch.Tensor) -> float:
        return float(task.objective(theta.to(torch.float64), weights)) - f_star

    title = f"synthetic: n = 64 (ring), d = 32, bytes to optimality gap ≤ {args.target:g} (from {start:.3g})"
    synthetic = compare(title, table, SYNTHETIC, cache, gap, args.target, args.max_rounds)
    print(f"synthetic: uncompressed / best compressed = {best_ratio(synthetic):.1f}x")
    if args.lm:
        table = lm_table(args.seed, args.data)
        task = cache.task(from_dict(table))

        def loss(task, weights: torch.Tensor, theta: torch.Tensor) -> float:
            return task.evaluate(theta, weights)["global_loss"]

        title = (
            f"language model: builtin:gpt2-tiny + LoRA r = 8 ({task.num_params:,} parameters), 8 clients, "
            f"bytes to global loss ≤ {args.lm_target:g}"
        )
        lm = compare(title, table, LANGUAGE_MODEL, cache, loss, args.lm_target, args.lm_rounds)
        print(f"language model: uncompressed / best compressed = {best_ratio(lm):.1f}x")
    print(f"bytes saved: {best_ratio(synthetic):.1f}x")


if __name__ == "__main__":
    main()
