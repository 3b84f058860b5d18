"""The Flower ServerApp: distdpo's federated training loop driven through a Flower ``Grid``.

Per round: distdpo's seeded client sampling picks S partitions; the strategy
(a Flower strategy, see :mod:`.strategies`) configures their train messages;
the replies are aggregated by the strategy; the server evaluates the new global
model with distdpo's :class:`~distdpo.metrics.Recorder`. ``train`` serves both
Flower's simulation engine and a deployed SuperLink (``app`` below, for
``flwr run``).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from distdpo import build
from distdpo.algorithms.federated import federated_round_bytes, sample_clients
from distdpo.checkpoint import RunCheckpoint
from distdpo.config import Config, ConfigError
from distdpo.engines.flower import common as wire
from distdpo.engines.flower.strategies import SampledGrid, Scaffold, load_strategy_state, make_strategy, strategy_state
from distdpo.faults import RankFailure


class ClientFailure(RankFailure):
    """A Flower client (a simulation actor or a SuperNode) died, failed or did not answer in time."""


def _raise_errors(
    replies: list[Message],
    nodes: list[int],
    what: str,
    partition_of: dict[int, int] | None = None,
    names: list[str] | None = None,
) -> None:
    """Raise :class:`ClientFailure` naming each failed or silent client by its partition (and node id)."""

    def client(node: int) -> str:
        pid = (partition_of or {}).get(node)
        if pid is None:
            return f"node {node}"
        name = f"client {names[pid]!r} " if names else "client "
        return f"{name}(partition-id {pid}, node {node})"

    errors = [m for m in replies if m.has_error()]
    if errors:
        m = errors[0]
        raise ClientFailure(f"{what}: {client(m.metadata.src_node_id)} failed: {m.error.reason}")
    silent = sorted(set(nodes) - {m.metadata.src_node_id for m in replies})
    if silent:
        raise ClientFailure(
            f"{what}: {len(silent)} of {len(nodes)} clients did not reply within engine.flower_timeout: "
            f"{', '.join(client(n) for n in silent)}"
        )


def discover_partitions(grid: Grid, config_text: str, num_clients: int, timeout: float) -> dict[int, int]:
    """partition-id → node id, asked of every connected node (waits until ``num_clients`` are connected)."""
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < num_clients:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} of {num_clients} SuperNodes connected within {timeout:.0f} s")
        time.sleep(0.1)
    content = RecordDict({"config": ConfigRecord({wire.CONFIG: config_text})})
    replies = list(grid.send_and_receive([Message(content, node, "query") for node in nodes], timeout=timeout))
    _raise_errors(replies, nodes, "partition discovery")
    node_of: dict[int, int] = {}
    for m in replies:
        pid = int(m.content["metrics"][wire.PARTITION])
        if pid in node_of:
            raise RuntimeError(
                f"two SuperNodes ({node_of[pid]}, {m.metadata.src_node_id}) claim {wire.PARTITION} = {pid}"
            )
        node_of[pid] = m.metadata.src_node_id
    missing = sorted(set(range(num_clients)) - set(node_of))
    if missing:
        raise RuntimeError(f"no SuperNode serves {wire.PARTITION} {missing} (the config has {num_clients} clients)")
    return node_of


def train(grid: Grid, cfg: Config, label: str, cache, *, progress: bool = True) -> tuple[list[dict], dict]:
    """Run one configuration over ``grid``; returns (metric rows, summary entry) like the simulator."""
    from distdpo.engines.loop import train_rounds
    from distdpo.metrics import Recorder

    task = cache.task(cfg)
    weights = build.client_weights(cfg, task.client_sizes)
    server = FlowerServer(grid, cfg, task, weights)
    rec = Recorder(cfg, label, task, weights, None, cache.optimum(cfg, task, weights))
    ckpt = RunCheckpoint(cfg, label, fingerprint=cache.fingerprint(cfg))  # continues from engine.checkpoint_dir/<label>
    theta = train_rounds(cfg, label, server, rec, ckpt, progress=progress)
    return rec.rows, rec.summary(theta)


class FlowerServer:
    """The server side of a federated run over a Flower grid, as an :class:`~distdpo.algorithms.base.Algorithm`.

    Each round it samples clients with the simulator's generator, sends them the model through the strategy,
    and aggregates their replies; its state (model, generators, strategy arrays) is one state dict.
    """

    def __init__(self, grid: Grid, cfg: Config, task, weights: torch.Tensor):
        a, e = cfg.algorithm, cfg.engine
        self.grid, self.cfg, self.task = grid, cfg, task
        self.n, self.dtype = task.num_clients, build.torch_dtype(cfg)
        self.text = wire.config_text(cfg)
        self.node_of = discover_partitions(grid, self.text, self.n, e.flower_timeout)
        self.partition_of = {node: pid for pid, node in self.node_of.items()}
        self.S = a.clients_per_round or self.n
        self.strategy = make_strategy(cfg, task, weights, self.S)
        if isinstance(self.strategy, Scaffold):
            self.strategy.node_partition = self.partition_of
        self.batch_size = build.batch_size(cfg)
        self.data_gen = torch.Generator().manual_seed(cfg.seed + 1)  # the simulator's minibatch generator
        self.sample_gen = torch.Generator().manual_seed(cfg.seed + 2)  # and its client-sampling generator
        self.theta = task.initial_params().to(self.dtype)

    def global_params(self) -> torch.Tensor:
        return self.theta

    def run_round(self, round_index: int) -> dict[str, float]:
        a, r = self.cfg.algorithm, round_index + 1
        sampled = sample_clients(self.sample_gen, self.n, self.S)
        config = ConfigRecord({wire.CONFIG: self.text, wire.RNG_STATE: wire.rng_to_bytes(self.data_gen)})
        if a.name == "fedprox":
            config["proximal-mu"] = a.mu  # FedProx's key; set here too when a server optimizer replaces FedProx
        for _ in range(a.local_steps):  # advance past the batches the clients draw from that state
            self.task.sample_batch(self.data_gen, self.batch_size)
        messages = list(
            self.strategy.configure_train(
                r,
                wire.to_record(theta=self.theta),
                config,
                SampledGrid(self.grid, [self.node_of[int(i)] for i in sampled]),
            )
        )
        replies = list(self.grid.send_and_receive(messages, timeout=self.cfg.engine.flower_timeout))
        _raise_errors(
            replies, [m.metadata.dst_node_id for m in messages], f"round {r}", self.partition_of, self.task.client_names
        )
        arrays, _ = self.strategy.aggregate_train(r, replies)
        if arrays is None:
            raise RuntimeError(f"round {r}: the strategy returned no model")
        self.theta = wire.from_record(arrays, wire.THETA, self.dtype, self.task.device)
        drift = sum(float(m.content["metrics"][wire.DRIFT]) for m in replies) / len(replies)
        sent = federated_round_bytes(
            len(sampled), self.task.num_params, self.theta.element_size(), a.name == "scaffold"
        )
        return {"client_drift": drift, "bytes": sent}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "theta": self.theta,
            "rng.data": self.data_gen.get_state(),
            "rng.sample": self.sample_gen.get_state(),
            **{f"strategy.{k}": v for k, v in strategy_state(self.strategy).items()},
        }

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.theta = tensors["theta"].to(self.theta.dtype)
        self.data_gen.set_state(tensors["rng.data"].to(torch.uint8).contiguous())
        self.sample_gen.set_state(tensors["rng.sample"].to(torch.uint8).contiguous())
        load_strategy_state(
            self.strategy, {k[len("strategy.") :]: v for k, v in tensors.items() if k.startswith("strategy.")}
        )


# ---- deployment: `flwr run flower_app <connection>` ----------------------------------------------

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run a distdpo config (run config ``config``, ``out``, ``set``, ``resume``) into a run directory."""
    from distdpo.config import load
    from distdpo.engines.flower import use_grid
    from distdpo.experiment import run_experiment

    rc = context.run_config
    if not rc.get("config"):
        raise ConfigError(
            "run config 'config' (path of a distdpo TOML config) is required: "
            "flwr run ... --run-config 'config=\"/abs/path.toml\"'"
        )
    overrides = [s for s in str(rc.get("set", "")).split(";") if s.strip()] + ['engine.name="flower"']
    cfg = load(str(rc["config"]), overrides)
    out = str(rc.get("out") or Path("runs") / f"{Path(str(rc['config'])).stem}-flower-{time.strftime('%Y%m%d-%H%M%S')}")
    with use_grid(grid):
        run_dir = run_experiment(cfg, out, resume=bool(rc.get("resume", False)), progress=False)
    print(f"distdpo: run directory {Path(run_dir).resolve()}")
