"""Which SuperNode serves which distdpo client, and which of a round's clients answered.

A SuperNode tells its ``partition-id`` when asked (a ``query`` message). Node ids change when a
SuperNode restarts, so a round whose sampled partitions are not all on connected nodes asks the
newcomers first. A round goes on with the replies it got when at least ``engine.min_clients`` of
its sampled clients answered; below that it stops naming the clients that failed or stayed silent.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from distdpo.engines.flower import common as wire
from distdpo.faults import RankFailure


class ClientFailure(RankFailure):
    """A Flower client (a simulation actor or a SuperNode) died, failed or did not answer in time."""


def _wait_for(grid: Grid, count: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < count:
        if time.monotonic() > deadline:
            raise ClientFailure(f"only {len(nodes)} of {count} SuperNodes connected within {timeout:.0f} s")
        time.sleep(0.1)
    return nodes


class Nodes:
    """partition-id ↔ node id over a grid, kept current as SuperNodes leave and rejoin."""

    def __init__(
        self, grid: Grid, config_text: str, num_clients: int | None, timeout: float, names: Sequence[str] = ()
    ):
        """``num_clients``: None to take it from the SuperNodes' ``num-partitions`` (per-site data)."""
        self.grid, self.text, self.timeout = grid, config_text, timeout
        self.names = list(names)
        self.node_of: dict[int, int] = {}
        self.info: dict[int, RecordDict] = {}  # partition-id → its node's answer (a site's counts)
        self.asked: set[int] = set()
        self._ask(_wait_for(grid, num_clients or 1, timeout), strict=True)
        self.n = num_clients or self._partitions()
        if len(self.asked) < self.n:
            self._ask(sorted(set(_wait_for(grid, self.n, timeout)) - self.asked), strict=True)
        missing = sorted(set(range(self.n)) - set(self.node_of))
        if missing:
            raise ClientFailure(f"no SuperNode serves {wire.PARTITION} {missing} (the run has {self.n} clients)")

    def _partitions(self) -> int:
        """The number of clients the SuperNodes' node configs agree on (``num-partitions``)."""
        counts = {int(c["metrics"][wire.NUM_PARTITIONS]) for c in self.info.values()}
        if len(counts) != 1 or min(counts) < 1:
            raise ClientFailure(
                f"the SuperNodes give num-partitions {sorted(counts)}: start each with --node-config "
                f'"{wire.PARTITION}=<i> {wire.NUM_PARTITIONS}=<number of sites> ..."'
            )
        return counts.pop()

    @property
    def partition_of(self) -> dict[int, int]:
        return {node: pid for pid, node in self.node_of.items()}

    def client(self, pid: int) -> str:
        name = f"client {self.names[pid]!r} " if self.names else "client "
        node = self.node_of.get(pid)
        return f"{name}(partition-id {pid}" + (f", node {node})" if node is not None else ", no node)")

    def _ask(self, nodes: list[int], *, strict: bool) -> None:
        """Learn the partitions of ``nodes``; ``strict``: every node must answer (the run's start)."""
        self.asked.update(nodes)
        content = RecordDict({"config": ConfigRecord({wire.CONFIG: self.text})})
        sent = [Message(content, node, "query") for node in nodes]
        replies = [m for m in self.grid.send_and_receive(sent, timeout=self.timeout) if not m.has_error()]
        if strict and len(replies) < len(sent):
            silent = sorted(set(nodes) - {m.metadata.src_node_id for m in replies})
            raise ClientFailure(f"partition discovery: SuperNodes {silent} did not answer within engine.flower_timeout")
        for m in replies:
            pid, node = int(m.content["metrics"][wire.PARTITION]), m.metadata.src_node_id
            if strict and pid in self.node_of:
                raise ClientFailure(f"two SuperNodes ({self.node_of[pid]}, {node}) claim {wire.PARTITION} = {pid}")
            self.node_of[pid] = node  # a restarted SuperNode replaces its predecessor
            self.info[pid] = m.content

    def refresh(self) -> None:
        """Before a round: forget the SuperNodes that left, and ask those that connected since (a restarted one
        has a new node id) which client they serve. Each node is asked once."""
        connected = set(self.grid.get_node_ids())
        self.node_of = {pid: node for pid, node in self.node_of.items() if node in connected}
        newcomers = sorted(connected - self.asked)
        if newcomers:
            self._ask(newcomers, strict=False)

    def check(self, replies: list[Message], sent: list[Message], sampled: Sequence[int], need: int, what: str):
        """The replies with content, if at least ``need`` of them; else :meth:`failure` is raised."""
        good = [m for m in replies if not m.has_error()]
        if len(good) < need:
            raise self.failure(replies, sent, sampled, need, what)
        return good

    def failure(self, replies: list[Message], sent: list[Message], sampled: Sequence[int], need: int, what: str):
        """A :class:`ClientFailure` naming each sampled client without a reply, and why."""
        partition_of = self.partition_of
        dst = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}
        errors, replied = {}, set()
        for m in replies:
            if m.has_error():  # the SuperLink's own error replies come from node 0: find the addressee
                node = dst.get(m.metadata.reply_to_message_id, m.metadata.src_node_id)
                errors[partition_of.get(node, -1)] = m.error.reason
            else:
                replied.add(partition_of.get(m.metadata.src_node_id))
        missing = [int(p) for p in sampled if int(p) not in replied]
        parts = [
            f"{self.client(p)}: {errors.get(p) or ('no reply' if p in self.node_of else 'no SuperNode')}"
            for p in missing
        ]
        return ClientFailure(
            f"{what}: {len(replied)} of {len(sampled)} sampled clients replied within engine.flower_timeout, "
            f"{need} needed (engine.min_clients); missing: " + "; ".join(parts)
        )
