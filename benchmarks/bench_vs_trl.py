"""distdpo vs TRL's DPOTrainer: DPO on the same tiny GPT-2 and the same HH-RLHF pairs, CPU, fp32.

Model: GPT-2 with 2 layers, 4 heads, width 128, random init, byte-level BPE
vocabulary of 4,096 trained here on the training text. Data: HH-RLHF
harmless-base (../shared/data). Batch 8 pairs, max length 256, β = 0.1,
50 steps, AdamW, full fine-tuning. Both frameworks load the identical model
and tokenizer from a temporary directory, each in its own process so that its
peak RSS is its own. Throughput counts real (non-padding) tokens of the pairs
in the usual two-sequence form (prompt+chosen and prompt+rejected), the same
definition on both sides.

    python benchmarks/bench_vs_trl.py            # needs `pip install trl` (the `bench` extra)

Last line: ``speedup: <distdpo tokens/s ÷ TRL tokens/s>x``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def load_pairs(path: Path, max_pairs: int):
    from distdpo.data.text import load_preferences

    data = load_preferences(path, "hh-rlhf")
    n = min(max_pairs, len(data))
    return data.prompt[:n], data.chosen[:n], data.rejected[:n]


def prepare(args, workdir: Path) -> None:
    """Train the tokenizer and save the random-init model once, for both workers."""
    from distdpo.lm.builtin import build_model, train_tokenizer

    P, C, R = load_pairs(args.data, args.max_pairs)
    tok = train_tokenizer(list(P) + list(C) + list(R), vocab_size=args.vocab)
    model = build_model("builtin:gpt2-tiny", len(tok), seed=args.seed)
    tok.save_pretrained(workdir)
    model.save_pretrained(workdir)


def worker_distdpo(args, workdir: Path) -> dict:
    import torch

    from distdpo import build
    from distdpo.config import from_dict

    torch.set_num_threads(args.threads)
    cfg = from_dict(
        {
            "seed": args.seed,
            "data": {
                "source": str(args.data),
                "format": "hh-rlhf",
                "num_clients": 1,
                "max_pairs": args.max_pairs,
                "eval_fraction": 0.0,
                "loss_pairs_per_client": 1,
            },
            "policy": {
                "kind": "causal_lm",
                "model": str(workdir),
                "beta": args.beta,
                "max_length": args.max_length,
                "lora_r": 0,
            },
            "algorithm": {
                "name": "centralized",
                "rounds": args.steps,
                "local_steps": 1,
                "batch_size": args.batch_size,
                "lr": args.lr,
                "optimizer": "adamw",
            },
            "engine": {"progress": False},
        }
    )
    task = build.build_task(cfg)
    weights = build.client_weights(cfg, task.client_sizes)
    algo = build.build_algorithm(cfg, task, None, None, weights)
    times = []
    start_tokens = algo.task._tokens
    for step in range(args.steps):
        t0 = time.perf_counter()
        algo.run_round(step)
        times.append(time.perf_counter() - t0)
    tokens = algo.task._tokens - start_tokens
    return {
        "seconds": sum(times),
        "tokens": tokens,
        "step_median_s": sorted(times)[len(times) // 2],
        "peak_rss_gib": peak_rss_gib(),
    }


def worker_trl(args, workdir: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(args.threads)
    P, C, R = load_pairs(args.data, args.max_pairs)
    dataset = Dataset.from_dict({"prompt": list(P), "chosen": list(C), "rejected": list(R)})
    tok = AutoTokenizer.from_pretrained(workdir)
    model = AutoModelForCausalLM.from_pretrained(workdir)
    counted = {"tokens": 0}

    def count(module, args_, kwargs):  # the policy's forward (with grad) sees chosen and rejected sequences
        mask = kwargs.get("attention_mask")
        if torch.is_grad_enabled() and mask is not None:
            counted["tokens"] += int(mask.sum())

    model.register_forward_pre_hook(count, with_kwargs=True)
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    config = DPOConfig(
        output_dir=str(workdir / "trl_out"),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=args.lr,
        beta=args.beta,
        max_length=args.max_length,
        logging_steps=10**6,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        fp16=False,
        dataloader_num_workers=0,
        seed=args.seed,
        lr_scheduler_type="constant",
        warmup_steps=0,
    )
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tok, callbacks=[StepTimer()])
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    return {
        "seconds": sum(times),
        "train_seconds": total,
        "tokens": counted["tokens"],
        "step_median_s": sorted(times)[len(times) // 2],
        "peak_rss_gib": peak_rss_gib(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=HH)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--max-pairs", type=int, default=2312)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--repeats", type=int, default=1, help="alternate the two workers this many times; medians are reported"
    )
    p.add_argument("--worker", choices=["distdpo", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        result = (worker_distdpo if args.worker == "distdpo" else worker_trl)(args, args.workdir)
        print("RESULT " + json.dumps(result))
        return

    import torch

    print(
        f"torch {torch.__version__}, {args.threads} threads, {platform.machine()} x{os.cpu_count()}, "
        f"python {platform.python_version()}"
    )
    print(
        f"workload: tiny GPT-2 (2 layers, 4 heads, width 128, vocab {args.vocab}), HH-RLHF harmless, "
        f"batch {args.batch_size}, "
        f"max length {args.max_length}, beta {args.beta}, {args.steps} steps, fp32, full fine-tuning, AdamW"
    )
    results: dict[str, list[dict]] = {"distdpo": [], "trl": []}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        prepare(args, workdir)
        passthrough = [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("repeats", "worker", "workdir")
        ]
        for r in range(args.repeats):
            for name in ("trl", "distdpo"):
                cmd = [sys.executable, __file__, *passthrough, "--worker", name, "--workdir", str(workdir)]
                proc = subprocess.run(
                    cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)}
                )
                line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode != 0 or not line:
                    sys.exit(f"{name} worker failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
                res = json.loads(line[-1][7:])
                results[name].append(res)
                print(
                    f"  repeat {r + 1}: {name:8s} {res['tokens'] / res['seconds']:8.0f} real tokens/s, "
                    f"{res['tokens'] / args.steps:6.0f} tokens/step, {res['seconds'] / args.steps:.3f} s/step (mean), "
                    f"{res['step_median_s']:.3f} (median), peak RSS {res['peak_rss_gib']:.2f} GiB"
                )

    def med(name, key):
        vals = sorted(r[key] for r in results[name])
        return vals[len(vals) // 2]

    tps = {n: sorted(r["tokens"] / r["seconds"] for r in results[n])[len(results[n]) // 2] for n in results}
    print(f"\n{'':10s}{'tokens/s':>12s}{'s/step':>10s}{'peak RSS GiB':>14s}")
    for n in ("distdpo", "trl"):
        print(f"{n:10s}{tps[n]:12.0f}{med(n, 'step_median_s'):10.3f}{med(n, 'peak_rss_gib'):14.2f}")
    print(f"memory ratio (distdpo / TRL peak RSS): {med('distdpo', 'peak_rss_gib') / med('trl', 'peak_rss_gib'):.2f}")
    print(f"speedup: {tps['distdpo'] / tps['trl']:.2f}x")


if __name__ == "__main__":
    main()
