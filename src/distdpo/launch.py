"""``distdpo launch``: a thin wrapper over ``torch.distributed.run`` (torchrun) for ``engine.name = "torchdist"``.

``distdpo launch --nproc P CONFIG …`` runs torchrun's launcher (in this process)
with ``--nproc-per-node P … -m distdpo run CONFIG … --set engine.name="torchdist"``
and returns non-zero when any rank failed. Users who manage their own launch call
torchrun directly: ``torchrun --nproc-per-node P -m distdpo CONFIG …``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def torchrun_argv(args: argparse.Namespace) -> list[str]:
    """torchrun's arguments for a parsed ``distdpo launch`` command line."""
    argv = [f"--nproc-per-node={args.nproc}", f"--nnodes={args.nnodes}"]
    if args.rdzv_endpoint:  # several machines: every one runs the same command with this endpoint
        argv += ["--rdzv-backend=c10d", f"--rdzv-endpoint={args.rdzv_endpoint}", f"--rdzv-id={args.rdzv_id}"]
        if args.node_rank is not None:
            argv.append(f"--node-rank={args.node_rank}")
    elif args.master_port:
        argv += ["--master-addr=127.0.0.1", f"--master-port={args.master_port}"]
    else:
        argv.append("--standalone")  # one machine, a free port picked by torchrun
    argv += ["-m", "distdpo", "run", args.config]
    if args.out:
        argv += ["--out", args.out]
    for s in args.set or []:
        argv += ["--set", s]
    argv += ["--set", 'engine.name="torchdist"']
    if args.resume:
        argv.append("--resume")
    if args.no_progress:
        argv.append("--no-progress")
    return argv


def add_parser(sub) -> None:
    p = sub.add_parser("launch", help="run a config on P torch.distributed processes (torchrun), engine torchdist")
    p.add_argument("config", help="path to a TOML config")
    p.add_argument("--nproc", type=int, required=True, help="processes (ranks) on this machine")
    p.add_argument("--nnodes", default="1", help="machines (torchrun's --nnodes; MIN:MAX allowed)")
    p.add_argument("--node-rank", type=int, help="this machine's rank (with --rdzv-endpoint)")
    p.add_argument("--rdzv-endpoint", help="HOST:PORT of the rendezvous (multi-machine; same on every machine)")
    p.add_argument("--rdzv-id", default="distdpo", help="job id shared by the machines of one job")
    p.add_argument("--master-port", type=int, help="fixed loopback port (default: torchrun --standalone picks one)")
    p.add_argument("--out", help="run directory (default: runs/<config>-<time>, chosen by rank 0)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run directory")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    if args.nproc < 1:
        print(f"error: --nproc must be at least 1, got {args.nproc}", file=sys.stderr)
        return 2
    if not Path(args.config).is_file():
        print(f"error: config file not found: {args.config}", file=sys.stderr)
        return 2
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args
    from torch.distributed.run import run as torchrun

    # torchrun's agent runs in this process: its failure table (which rank, exit code) is printed once,
    # without a launcher traceback, and Ctrl-C / SIGTERM give 130 / 143 after every rank has stopped.
    try:
        torchrun(parse_args(torchrun_argv(args)))
    except ChildFailedError as e:
        print(e.format_msg(), file=sys.stderr)
        return 1
    except SignalException as e:
        return 128 + int(e.sigval)
    return 0


# ---- what `distdpo run` needs when it is one rank of a torchdist job


def watch_launcher(poll_s: float = 0.5, grace_s: float = 5.0) -> None:
    """A torchrun worker ends itself when its launcher dies (even by SIGKILL), instead of training on as an orphan.

    The worker's parent is torchrun's agent (``distdpo launch`` runs it in-process); when the parent goes, the
    worker is re-parented. A daemon thread notices within ``poll_s``, sends this process SIGTERM (a clean stop:
    writes are atomic, checkpoints resume) and, if that has not ended it within ``grace_s``, exits hard.
    """
    import os
    import signal
    import threading
    import time

    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os._exit(143)

    threading.Thread(target=watch, name="distdpo-launcher-watch", daemon=True).start()


def uses_torchdist(cfg) -> bool:
    from distdpo.config import expand

    return any(c.engine.name == "torchdist" for c in expand(cfg).values())


def join_job(cfg, out: Path) -> tuple[Path, bool]:
    """Join the torchdist job (if the config uses it): (rank 0's run directory, whether this rank writes)."""
    if not uses_torchdist(cfg):
        return out, True
    from distdpo.engines import torchdist

    torchdist.init(cfg)
    return torchdist.agree(out), torchdist.rank() == 0


def is_rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def leave_job() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        from distdpo.engines import torchdist

        torchdist.shutdown()
