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
from flwr.app import ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp

from distdpo import build
from distdpo.algorithms.federated import federated_round_bytes, sample_clients
from distdpo.algorithms.lora import aggregate_lora
from distdpo.checkpoint import RunCheckpoint
from distdpo.config import Config, ConfigError
from distdpo.engines.flower import common as wire
from distdpo.engines.flower import sites
from distdpo.engines.flower.nodes import ClientFailure, Nodes
from distdpo.engines.flower.privacy import PrivacyLedger
from distdpo.engines.flower.secure import as_reply, secure_round
from distdpo.engines.flower.strategies import SampledGrid, Scaffold, load_strategy_state, make_strategy, strategy_state

__all__ = ["ClientFailure", "FlowerServer", "app", "train"]


def train(grid: Grid, cfg: Config, label: str, cache, *, progress: bool = True) -> tuple[list[dict], dict]:
    """Run one configuration over ``grid``; returns (metric rows, summary entry) like the simulator."""
    from distdpo.engines.loop import train_rounds
    from distdpo.metrics import Recorder

    nodes = None
    if build.data_stays_at_sites(cfg):  # the server reads no data: the sites tell their counts and measure the model
        from distdpo.data.sites import site_files

        count = len(site_files(cfg)) if cfg.data.site_data else None  # else: the SuperNodes' num-partitions
        nodes = Nodes(grid, wire.config_text(cfg), count, cfg.engine.flower_timeout)
        task = cache.tasks[build.task_key(cfg)] = sites.RemoteSites(cfg, grid, nodes)
        cache.fingerprints[build.task_key(cfg)] = task.fingerprint()
    else:
        task = cache.task(cfg)
    weights = build.client_weights(cfg, task.client_sizes)
    server = FlowerServer(grid, cfg, task, weights, nodes)
    extra = ["dp_epsilon"] if server.privacy else []
    optimum = None if nodes else cache.optimum(cfg, task, weights)
    rec = Recorder(cfg, label, task, weights, None, optimum, extra_columns=extra)
    ckpt = RunCheckpoint(cfg, label, fingerprint=cache.fingerprint(cfg))  # continues from engine.checkpoint_dir/<label>
    theta = train_rounds(cfg, label, server, rec, ckpt, progress=progress)
    summary = rec.summary(theta)
    if server.privacy:
        summary["privacy"] = server.privacy.summary(cfg.algorithm.rounds)
    if nodes:
        summary["flower"] = {"files_read": task.files_by_site}  # by each site, of its own
    return rec.rows, summary


class FlowerServer:
    """The server side of a federated run over a Flower grid, as an :class:`~distdpo.algorithms.base.Algorithm`.

    Each round it samples clients with the simulator's generator, sends them the model through the strategy,
    and aggregates the replies it got (at least ``engine.min_clients``; with ``engine.secure_aggregation``
    only their SecAgg+ sum); its state (model, generators, strategy arrays) is one state dict.
    """

    def __init__(self, grid: Grid, cfg: Config, task, weights: torch.Tensor, nodes: Nodes | None = None):
        a, e = cfg.algorithm, cfg.engine
        self.grid, self.cfg, self.task = grid, cfg, task
        self.n, self.dtype = task.num_clients, build.torch_dtype(cfg)
        self.text = wire.config_text(cfg)
        self.S = a.clients_per_round or self.n
        self.need = e.min_clients or self.S  # replies a round needs
        if self.need > self.S or (e.secure_aggregation and self.need < 2):
            raise ConfigError(
                f"engine.min_clients = {e.min_clients} with {self.S} clients sampled per round: it must be at most "
                "that" + (" and, with engine.secure_aggregation, at least 2" if e.secure_aggregation else "")
            )
        self.nodes = nodes or Nodes(grid, self.text, self.n, e.flower_timeout, task.client_names)
        self.strategy = make_strategy(cfg, task, weights, self.S)
        self.num_examples = torch.tensor([wire.num_examples(cfg, int(size)) for size in task.client_sizes])
        self.privacy = PrivacyLedger(cfg, self.num_examples, self.S, self.need) if e.dp_clip > 0 else None
        self.batch_size = build.batch_size(cfg)
        self.data_gen = torch.Generator().manual_seed(cfg.seed + 1)  # the simulator's minibatch generator
        self.sample_gen = torch.Generator().manual_seed(cfg.seed + 2)  # and its client-sampling generator
        self.theta = task.initial_params().to(self.dtype)
        layout = getattr(task, "lora_layout", None)
        self.lora = layout() if callable(layout) else None

    def global_params(self) -> torch.Tensor:
        return self.theta

    def run_round(self, round_index: int) -> dict[str, float]:
        a, r = self.cfg.algorithm, round_index + 1
        sampled = sample_clients(self.sample_gen, self.n, self.S).tolist()
        config = (
            self.task.config() if isinstance(self.task, sites.RemoteSites) else ConfigRecord({wire.CONFIG: self.text})
        )
        config[wire.RNG_STATE] = wire.rng_to_bytes(self.data_gen)
        if a.name == "fedprox":
            config["proximal-mu"] = a.mu  # FedProx's key; set here too when a server optimizer replaces FedProx
        for _ in range(a.local_steps):  # advance past the batches the clients draw from that state
            self.task.sample_batch(self.data_gen, self.batch_size)
        self.nodes.refresh()  # SuperNodes that left or (re)joined: a restarted one has a new node id
        if isinstance(self.strategy, Scaffold):
            self.strategy.node_partition = self.nodes.partition_of
        reached = [self.nodes.node_of[p] for p in sampled if p in self.nodes.node_of]
        if len(reached) < self.need:  # too many sampled clients have no SuperNode: the round cannot succeed
            raise self.nodes.failure([], [], sampled, self.need, f"round {r}")
        grid = SampledGrid(self.grid, reached)
        messages = list(self.strategy.configure_train(r, wire.to_record(theta=self.theta), config, grid))
        if self.cfg.engine.secure_aggregation:
            replies, metrics = self._secure(r, grid, messages, sampled)
        else:
            replies = list(grid.send_and_receive(messages, timeout=self.cfg.engine.flower_timeout))
            replies = self.nodes.check(replies, messages, sampled, self.need, f"round {r}")
            # In partition order, not arrival order: the strategy's float32 sum is then the same on every run.
            replies.sort(key=lambda m: int(m.content["metrics"][wire.PARTITION]))
            metrics = [m.content["metrics"] for m in replies]
        arrays, _ = self.strategy.aggregate_train(r, replies)
        if arrays is None:
            raise RuntimeError(f"round {r}: the strategy returned no model")
        self.theta = wire.from_record(arrays, wire.THETA, self.dtype, self.task.device)
        stats = self._lora(r, replies, metrics) if self.lora and not self.cfg.engine.secure_aggregation else {}
        stats |= {
            "client_drift": sum(float(m[wire.DRIFT]) for m in metrics) / len(metrics),
            "clients_replied": len(metrics),
            "bytes": self._bytes(len(messages), len(metrics)),
        }
        if self.privacy is not None:
            stats["dp_epsilon"] = self.privacy.epsilon(r)
        return stats

    def _lora(self, r: int, replies: list[Message], metrics: list) -> dict[str, float]:
        """``product``: the replies' Σ p_i B_i A_i re-factored replaces the strategy's average; every mode reports
        ``lora_aggregation_error`` on the rounds that get a metric row (as :class:`~distdpo.algorithms.federated.
        Federated` does; the replies are each client's θ_K, so θ + Δ_i)."""
        from distdpo.metrics import evaluated

        mode = self.cfg.algorithm.lora_aggregation
        if mode != "product" and not evaluated(self.cfg, r):
            return {}
        ends = torch.stack([wire.from_record(m.content["arrays"], wire.THETA, self.dtype) for m in replies])
        p = torch.tensor([float(m[wire.NUM_EXAMPLES]) for m in metrics], dtype=torch.float64)
        merged, error = aggregate_lora(ends, p / p.sum(), self.lora, mode)
        if mode == "product":
            self.theta = merged.to(self.theta)
        return {"lora_aggregation_error": error}

    def _secure(self, r: int, grid: SampledGrid, messages: list[Message], sampled: list[int]):
        """SecAgg+ over the round's messages: (one reply for the strategy, the metrics of each summed client)."""
        e = self.cfg.engine
        average, results = secure_round(grid, messages, r, self.need, float(self.num_examples.max()), e.flower_timeout)
        if average is None or len(results) < self.need:  # the protocol halted: name who was missing at its last step
            raise self.nodes.failure(grid.last_replies, grid.last_sent, sampled, self.need, f"round {r} (SecAgg+)")
        return [as_reply(self.theta, average, messages[0].metadata.dst_node_id)], [res.metrics for res in results]

    def _bytes(self, sent: int, replied: int) -> int:
        """The model (and SCAFFOLD's correction) down to every reached client, an update up from each reply."""
        scaffold = isinstance(self.strategy, Scaffold)
        per_vector = self.task.num_params * self.theta.element_size()
        return (
            federated_round_bytes([self.task.num_params] * replied, self.theta.element_size(), scaffold)
            + (sent - replied) * (2 if scaffold else 1) * per_vector
        )

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
