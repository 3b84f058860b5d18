"""``distdpo`` command line: ``run`` an experiment config, ``eval`` a model on preference pairs, describe a
``graph``, ``reproduce`` the paper's claims."""

from __future__ import annotations

import argparse
import json
import os
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
    models = ", models/<run>/" if (run_dir / "models").is_dir() else ""
    print(f"\nrun directory: {run_dir}  (config.toml, metrics.csv, summary.json, *.png{models})")
    bad = {label: s for label, s in summary["runs"].items() if s.get("status", "ok") != "ok"}
    if bad:
        print(f"error: {len(bad)} of {len(summary['runs'])} run(s) did not finish well:", file=sys.stderr)
        for label, s in bad.items():
            print(f"  {label}: {s['status']}: {s.get('reason') or s.get('error', '')}", file=sys.stderr)
        return 1
    return 0


def _cmd_split(args: argparse.Namespace) -> int:
    from distdpo.config import ConfigError, load
    from distdpo.data.split import split_text_data, write_split

    cfg = load(args.config, args.set or [])
    if cfg.data.source == "synthetic":
        raise ConfigError(
            "distdpo split writes text preference data per client; this config's data.source is 'synthetic'"
        )
    split = split_text_data(cfg)
    out = write_split(split, cfg, args.out)
    width = max(len(n) for n in split.names)
    for name, train, held in zip(split.names, split.train, split.eval):
        print(f"{name:<{width}}  train {len(train):>6}  eval {len(held):>5}")
    s = split.stats
    print(
        f"\n{s['pairs']} pairs loaded, {s['pairs_sharing_prompt']} share a prompt with another pair, "
        f"{s['exact_duplicates']} exact duplicates ({s['duplicates_dropped_within_client']} dropped within a client); "
        "held-out pairs are grouped by prompt across all clients"
    )
    print(f"split directory: {out}  (<client>/train.jsonl, <client>/eval.jsonl, manifest.json)")
    return 0


def _cmd_init_model(args: argparse.Namespace) -> int:
    from distdpo.config import ConfigError
    from distdpo.data.text import DataFormatError
    from distdpo.lm.builtin import BUILTIN, init_model, tokenizer_texts

    if args.model.removeprefix("builtin:") not in BUILTIN or not args.model.startswith("builtin:"):
        raise ConfigError(
            f"{args.model!r} is not a built-in model; expected one of {', '.join('builtin:' + k for k in BUILTIN)}"
        )
    if args.vocab_size < 1:
        raise ConfigError(f"--vocab-size must be a positive number of tokens, got {args.vocab_size}")
    try:
        texts = tokenizer_texts(args.tokenizer_text)
    except FileNotFoundError:
        raise ConfigError(f"--tokenizer-text {args.tokenizer_text} does not exist") from None
    except (DataFormatError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"--tokenizer-text {args.tokenizer_text}: {e}") from None
    if not texts:
        raise ConfigError(f"--tokenizer-text {args.tokenizer_text} holds no text to train a tokenizer on")
    try:
        out = init_model(args.model, texts, args.out, vocab_size=args.vocab_size, seed=args.seed)
    except FileExistsError as e:
        raise ConfigError(str(e)) from None
    print(f"{args.model} (seed {args.seed}, tokenizer trained on {len(texts)} texts) written to {out}")
    print(f'every site sets policy.model = "{Path(out).resolve()}"')
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from distdpo.build import device
    from distdpo.config import ConfigError, from_dict
    from distdpo.lm.scoring import check_out, evaluate, format_summary, write_scores

    if args.beta is not None and args.beta <= 0:
        raise ConfigError(f"--beta must be positive, got {args.beta}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.out:
        check_out(args.out)  # before the model is loaded and every pair scored
    records, summary = evaluate(
        args.model,
        args.data,
        adapter=args.adapter,
        format=args.format,
        max_length=args.max_length,
        beta=args.beta,
        batch_size=args.batch_size,
        device=device(from_dict({"engine": {"device": args.device}})),
    )
    print(format_summary(summary))
    if args.out:
        beside = write_scores(args.out, records, summary)
        print(f"\nscores: {args.out}  (one JSON line a pair), summary: {beside}")
    return 0


def _cmd_graph(args: argparse.Namespace) -> int:
    from distdpo.topology import graph_command

    return graph_command(args.graph, args.nodes, weights=args.weights, seed=args.seed, er_p=args.p, as_json=args.json)


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from distdpo.reproduce import format_claims, reproduce

    out = reproduce(
        args.dataset,
        seeds=args.seeds,
        quick=args.quick,
        out=args.out,
        progress=not args.no_progress,
        resume=args.resume,
        command="distdpo " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["reproduce"] else "",
    )
    summary = json.loads((out / "summary.json").read_text())
    print(format_claims(summary))
    print(
        f"\nreport: {out / 'report.html'}  (report.md, figures/, metrics.csv, summary.json)  "
        f"in {summary['wall_time_s']:.1f} s"
    )
    failures = [f"run {label}: {err}" for label, err in summary.get("failed_runs", {}).items()]
    failures += [f"analysis {exp}: {err}" for exp, err in summary.get("failed_analyses", {}).items()]
    if failures:
        print(f"error: {len(failures)} part(s) of the suite failed (listed in the report):", file=sys.stderr)
        for line in failures:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distdpo", description="Federated and decentralized Direct Preference Optimization."
    )
    parser.add_argument("--version", action="version", version=f"distdpo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run an experiment config (TOML) into a run directory")
    run.add_argument("config", help="path to a TOML config")
    run.add_argument("--out", help="run directory (default: runs/<config>-<time>)")
    run.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. algorithm.lr=0.1 (repeatable)"
    )
    run.add_argument(
        "--resume", action="store_true", help="continue an interrupted run directory, skipping finished runs"
    )
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    run.set_defaults(func=_cmd_run)

    from distdpo.launch import add_parser as add_launch_parser

    add_launch_parser(sub)

    split = sub.add_parser("split", help="write each client's training and held-out pairs of a config as its own files")
    split.add_argument("config", help="path to a TOML config with text preference data")
    split.add_argument(
        "--out", required=True, help="a new directory: <client>/train.jsonl, <client>/eval.jsonl, manifest.json"
    )
    split.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    split.set_defaults(func=_cmd_split)

    from distdpo.data.text import FORMATS

    ev = sub.add_parser("eval", help="score a model (and adapter) on preference pairs: log-probs and accuracy")
    ev.add_argument("--model", required=True, help="a model directory, hub id, PEFT adapter or distdpo export")
    ev.add_argument("--adapter", help="a PEFT adapter directory (or hub id) to apply to --model")
    ev.add_argument("--data", required=True, help="a preference file (.jsonl, .json, .parquet, .csv) or dataset id")
    ev.add_argument("--format", default="auto", choices=FORMATS, help="the data format (default: detected)")
    ev.add_argument("--max-length", type=int, help="tokens of prompt + completion (default: the export's, or 256)")
    ev.add_argument("--beta", type=float, help="β of the implicit reward (default: the export's, or 1.0)")
    ev.add_argument("--batch-size", type=int, default=16, help="pairs per forward pass")
    ev.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"), help="where the model runs")
    ev.add_argument("--out", help="write one JSON line a pair here, and the summary to <name>.summary.json beside")
    ev.set_defaults(func=_cmd_eval)

    init = sub.add_parser("init-model", help="create a built-in model once, for sites that share no data")
    init.add_argument("model", help="builtin:gpt2-tiny or builtin:llama-tiny")
    init.add_argument(
        "--tokenizer-text", required=True, help="text to train the tokenizer on: a preference file or a .txt file"
    )
    init.add_argument("--out", required=True, help="a new directory for the model and its tokenizer")
    init.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size (default 4096)")
    init.add_argument("--seed", type=int, default=0, help="seed of the random initialisation (default 0)")
    init.set_defaults(func=_cmd_init_model)

    graph = sub.add_parser("graph", help="describe a communication graph: edges, λ2, spectral gap")
    graph.add_argument("graph", help="graph name (ring, torus, …) or an edge-list file with one 'u v' pair a line")
    graph.add_argument("--nodes", "-n", type=int, help="number of nodes (required for a graph name)")
    graph.add_argument(
        "--weights", default="metropolis", help="mixing rule: metropolis, max_degree, lazy_metropolis, lazy_max_degree"
    )
    graph.add_argument("--seed", type=int, default=0, help="seed for random graphs (erdos_renyi)")
    graph.add_argument("--p", type=float, default=None, help="edge probability for erdos_renyi")
    graph.add_argument("--json", action="store_true", help="print JSON")
    graph.set_defaults(func=_cmd_graph)

    rep = sub.add_parser(
        "reproduce", help="run the paper's experiments and write a report holding its claims against the data"
    )
    rep.add_argument(
        "--dataset",
        default="synthetic",
        help="synthetic (default); hh-rlhf-features or pandalm-features (log-linear on text features); hh-rlhf or "
        "pandalm (small causal LM)",
    )
    rep.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="seeds per configuration (default 3 for synthetic, 2 for the language-model datasets)",
    )
    rep.add_argument("--out", help="output directory (default: runs/reproduce-<dataset>-<time>)")
    rep.add_argument("--quick", action="store_true", help="a small version of every experiment (well under a minute)")
    rep.add_argument(
        "--resume", action="store_true", help="continue an interrupted run in --out, reusing its finished runs"
    )
    rep.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    rep.set_defaults(func=_cmd_reproduce)
    return parser


def main(argv: list[str] | None = None) -> int:
    from distdpo.config import ConfigError
    from distdpo.data.text import DataFormatError
    from distdpo.faults import RankFailure
    from distdpo.launch import is_rank0, leave_job, watch_launcher

    watch_launcher()  # a torchrun worker: end with the launcher, never train on as an orphan

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in ("run", "split", "eval", "graph", "reproduce", "launch") and Path(argv[0]).is_file():
        argv.insert(0, "run")  # `python -m distdpo CONFIG …` (what torchrun starts) means `distdpo run CONFIG …`
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DataFormatError as e:
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
    except OSError as e:
        if e.filename is None:
            return _internal_error(e)
        print(f"error: {e.filename}: {e.strerror or e}", file=sys.stderr)  # a path the user gave or chose
        return 2
    except Exception as e:  # a bug, not the user's mistake: one line here, the traceback in a log file
        return _internal_error(e)
    finally:
        leave_job()


def _internal_error(e: BaseException) -> int:
    import tempfile
    import traceback

    from distdpo.io import cache_dir

    text = "".join(traceback.format_exception(e))
    for folder in (cache_dir() / "logs", Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"distdpo-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
            path.write_text(text)
            break
        except OSError:
            path = None
    where = f"; the traceback is in {path}" if path else ""
    print(f"error: internal error, {type(e).__name__}: {e}{where} (please report it)", file=sys.stderr)
    return 3
