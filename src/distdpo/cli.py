"""``distdpo`` command line: ``run`` an experiment config, describe a ``graph``, ``reproduce`` the paper's claims."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from distdpo import __version__


def _cmd_run(args: argparse.Namespace) -> int:
    from distdpo.config import load
    from distdpo.experiment import format_summary, run_experiment
    from distdpo.launch import join_job

    cfg = load(args.config, args.set or [])
    out = Path(args.out) if args.out else Path("runs") / f"{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    out, writer = join_job(cfg, out)  # torchdist: every rank uses rank 0's directory; only rank 0 writes
    run_dir = run_experiment(cfg, out, resume=args.resume, progress=not args.no_progress)
    if not writer:
        return 0
    summary = json.loads((run_dir / "summary.json").read_text())
    print(format_summary(summary))
    print(f"\nrun directory: {run_dir}  (config.toml, metrics.csv, summary.json, *.png)")
    return 0


def _cmd_graph(args: argparse.Namespace) -> int:
    from distdpo.topology import graph_command

    return graph_command(args.graph, args.nodes, weights=args.weights, seed=args.seed, er_p=args.p, as_json=args.json)


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from distdpo.reproduce import format_claims, reproduce

    out = reproduce(args.dataset, seeds=args.seeds, quick=args.quick, out=args.out, progress=not args.no_progress, resume=args.resume,
                    command="distdpo " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["reproduce"] else "")
    summary = json.loads((out / "summary.json").read_text())
    print(format_claims(summary))
    print(f"\nreport: {out / 'report.html'}  (report.md, figures/, metrics.csv, summary.json)  in {summary['wall_time_s']:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distdpo", description="Federated and decentralized Direct Preference Optimization.")
    parser.add_argument("--version", action="version", version=f"distdpo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run an experiment config (TOML) into a run directory")
    run.add_argument("config", help="path to a TOML config")
    run.add_argument("--out", help="run directory (default: runs/<config>-<time>)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. algorithm.lr=0.1 (repeatable)")
    run.add_argument("--resume", action="store_true", help="continue an interrupted run directory, skipping finished runs")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    run.set_defaults(func=_cmd_run)

    from distdpo.launch import add_parser as add_launch_parser

    add_launch_parser(sub)

    graph = sub.add_parser("graph", help="describe a communication graph: edges, λ2, spectral gap")
    graph.add_argument("graph", help="graph name (ring, torus, …) or an edge-list file with one 'u v' pair a line")
    graph.add_argument("--nodes", "-n", type=int, help="number of nodes (required for a graph name)")
    graph.add_argument("--weights", default="metropolis", help="mixing rule: metropolis, max_degree, lazy_metropolis, lazy_max_degree")
    graph.add_argument("--seed", type=int, default=0, help="seed for random graphs (erdos_renyi)")
    graph.add_argument("--p", type=float, default=None, help="edge probability for erdos_renyi")
    graph.add_argument("--json", action="store_true", help="print JSON")
    graph.set_defaults(func=_cmd_graph)

    rep = sub.add_parser("reproduce", help="run the paper's experiments and write a report holding its claims against the data")
    rep.add_argument("--dataset", default="synthetic", help="synthetic (default), hh-rlhf or pandalm")
    rep.add_argument("--seeds", type=int, default=None,
                     help="seeds per configuration (default 3 for synthetic, 2 for the language-model datasets)")
    rep.add_argument("--out", help="output directory (default: runs/reproduce-<dataset>-<time>)")
    rep.add_argument("--quick", action="store_true", help="a small version of every experiment (well under a minute)")
    rep.add_argument("--resume", action="store_true", help="continue an interrupted run in --out, reusing its finished runs")
    rep.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    rep.set_defaults(func=_cmd_reproduce)
    return parser


def main(argv: list[str] | None = None) -> int:
    from distdpo.config import ConfigError

    from distdpo.faults import RankFailure
    from distdpo.launch import is_rank0, leave_job

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in ("run", "graph", "reproduce", "launch") and Path(argv[0]).is_file():
        argv.insert(0, "run")  # `python -m distdpo CONFIG …` (what torchrun starts) means `distdpo run CONFIG …`
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RankFailure as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C (130), or SIGTERM from torchrun tearing a job down (143)
        code = getattr(e, "exit_code", 130)
        if is_rank0() and code == 130:
            print("interrupted; finished runs are saved (continue with --resume)", file=sys.stderr)
        return code
    finally:
        leave_job()
