"""Rank failures of a distributed run, and the fault injection the fault tests use.

``DISTDPO_FAULT="<kind>:<rank>:<round>"`` makes ``rank`` misbehave when it
starts round ``round`` (1-based): ``exit`` (the process dies at once, exit 1),
``hang`` (it stops responding) or ``killjob`` (SIGKILL to its whole process
group: the launcher and every rank die at once, as a crashed machine would).
Unset, :func:`inject` costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import time


class RankFailure(RuntimeError):
    """A distributed run lost a rank (dead, or silent for longer than ``engine.timeout_s``)."""


def inject(rank: int, round_index: int) -> None:
    spec = os.environ.get("DISTDPO_FAULT")
    if not spec:
        return
    kind, at_rank, at_round = spec.split(":")
    if int(at_rank) != rank or int(at_round) != round_index:
        return
    if kind == "exit":
        os._exit(1)
    if kind == "hang":
        while True:
            time.sleep(3600)
    if kind == "killjob":
        os.killpg(os.getpgrp(), signal.SIGKILL)
    raise ValueError(f"DISTDPO_FAULT: unknown fault {kind!r} (exit, hang, killjob)")
