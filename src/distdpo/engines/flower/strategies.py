"""distdpo's federated algorithms as Flower strategies.

FedAvg, FedProx, FedAvgM, FedAdam, FedYogi and FedAdagrad are Flower's own
strategies; SCAFFOLD is a FedAvg subclass whose server step is distdpo's
(Option II, as in :meth:`distdpo.algorithms.federated.Federated.run_round`).
Client sampling is distdpo's (seeded, so runs match the simulator): each round
the strategy sees a grid that lists only the sampled nodes.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedYogi,
    Strategy,
)

from distdpo import build
from distdpo.algorithms.federated import scaffold_controls
from distdpo.algorithms.optim import ServerOptimizer
from distdpo.config import ALGORITHM_SPECS, Config, ConfigError, resolve_server_optimizer
from distdpo.engines.flower import common as wire


class SampledGrid(Grid):
    """A view of a grid whose ``get_node_ids`` is this round's sampled nodes (the rest delegates)."""

    def __init__(self, grid: Grid, node_ids: list[int]):
        self._grid, self._node_ids = grid, list(node_ids)
        self.last_sent: list[Message] = []  # the last exchange, to name who did not answer
        self.last_replies: list[Message] = []

    def set_run(self, run) -> None:
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._node_ids)

    def push_messages(self, messages):
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids):
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages, *, timeout=None):
        self.last_sent = list(messages)
        self.last_replies = list(self._grid.send_and_receive(self.last_sent, timeout=timeout))
        return self.last_replies


class Scaffold(FedAvg):
    """SCAFFOLD (Karimireddy et al., Option II) with server-held control variates.

    The server keeps c and every c_i (as distdpo's simulator does) and sends each
    sampled client its correction c − c_i, so clients are stateless and a resumed
    run is exact. Client i returns θ_i,K; the server sets
    c_i⁺ = c_i − c + (θ − θ_i,K)/(Kη), c ← c + Σ_{i∈S} (|D_i|/Σ_j |D_j|)(c_i⁺ − c_i)
    (weights p_i of the global loss), and θ ← θ + η_g Σ_{i∈S} w_i (θ_i,K − θ) with w
    renormalized over S.
    """

    def __init__(
        self,
        *,
        num_clients: int,
        num_params: int,
        weights: torch.Tensor,
        local_steps: int,
        lr: float,
        server_lr: float,
        dtype: torch.dtype,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.weights = weights.to(dtype)  # p_i over all clients, sums to 1
        self.K, self.lr, self.dtype = local_steps, lr, dtype
        self.server = ServerOptimizer("sgd", server_lr)
        self.c = torch.zeros(num_params, dtype=dtype)
        self.c_local = torch.zeros(num_clients, num_params, dtype=dtype)
        self.node_partition: dict[int, int] = {}
        self.theta: torch.Tensor | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.theta = wire.from_record(arrays, wire.THETA, self.dtype)
        config["server-round"] = server_round
        messages = []
        for node_id in grid.get_node_ids():
            i = self.node_partition[node_id]
            record = RecordDict(
                {
                    self.arrayrecord_key: wire.to_record(theta=self.theta, correction=self.c - self.c_local[i]),
                    self.configrecord_key: config,
                }
            )
            messages.append(Message(content=record, message_type="train", dst_node_id=node_id))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        parts = torch.tensor([int(m.content["metrics"][wire.PARTITION]) for m in valid])
        X = torch.stack([wire.from_record(m.content["arrays"], wire.THETA, self.dtype) for m in valid])
        start = self.theta.expand_as(X)
        p = torch.tensor([float(m.content["metrics"][wire.NUM_EXAMPLES]) for m in valid], dtype=self.dtype)
        update = (p / p.sum()) @ (X - start)
        new_c = scaffold_controls(self.c, self.c_local[parts], start, X, self.K, self.lr)
        self.c = self.c + self.weights[parts] @ (new_c - self.c_local[parts])
        self.c_local[parts] = new_c
        theta = self.server.step(self.theta, update)
        return wire.to_record(theta=theta), self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)

    # state for checkpoints
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"c": self.c, "c_local": self.c_local}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.c, self.c_local = tensors["c"].to(self.dtype), tensors["c_local"].to(self.dtype)


def make_strategy(cfg: Config, task, weights: torch.Tensor, num_sampled: int) -> Strategy:
    """The Flower strategy for ``cfg.algorithm`` (optionally wrapped in Flower's DP fixed clipping).

    The algorithm's entry in ``config.ALGORITHM_SPECS`` picks it: SCAFFOLD's control variates, FedProx's
    proximal term, else the server step (``algorithm.server_optimizer``, or the algorithm's own for "auto").
    """
    a, e = cfg.algorithm, cfg.engine
    spec = ALGORITHM_SPECS[a.name]
    # Sampling happens before the strategy sees the grid (SampledGrid): take every node it is shown, however few
    # (a sampled client's SuperNode may be gone: engine.min_clients decides whether the round goes on).
    common = {"fraction_train": 1.0, "fraction_evaluate": 0.0, "min_train_nodes": 1, "min_available_nodes": 1}
    opt = resolve_server_optimizer(a)
    adaptive = {"eta": a.server_lr, "eta_l": a.lr, "tau": a.server_tau, **common}
    if spec.scaffold:
        if opt != "sgd":
            raise ConfigError(
                f"algorithm.server_optimizer = {a.server_optimizer!r}: engine 'flower' runs SCAFFOLD "
                "with the sgd server step"
            )
        strategy: Strategy = Scaffold(
            num_clients=task.num_clients,
            num_params=task.num_params,
            weights=weights,
            local_steps=a.local_steps,
            lr=a.lr,
            server_lr=a.server_lr,
            dtype=build.torch_dtype(cfg),
            **common,
        )
    elif opt == "sgd" and a.server_lr == 1.0:
        strategy = FedProx(proximal_mu=a.mu, **common) if spec.prox else FedAvg(**common)
    elif opt in ("sgd", "avgm"):
        strategy = FedAvgM(
            server_learning_rate=a.server_lr, server_momentum=a.server_momentum if opt == "avgm" else 0.0, **common
        )
    elif opt == "adam":
        strategy = FedAdam(beta_1=a.server_momentum, beta_2=a.server_beta2, **adaptive)
    elif opt == "yogi":
        strategy = FedYogi(beta_1=a.server_momentum, beta_2=a.server_beta2, **adaptive)
    else:  # adagrad
        strategy = FedAdagrad(**adaptive)
    if e.dp_clip > 0:
        if spec.scaffold:
            raise ConfigError(
                "engine.dp_clip: Flower's DP clipping wrappers do not apply to SCAFFOLD's control variates"
            )
        wrapper = (
            DifferentialPrivacyServerSideFixedClipping
            if e.dp_side == "server"
            else DifferentialPrivacyClientSideFixedClipping
        )
        strategy = wrapper(
            strategy, noise_multiplier=e.dp_noise, clipping_norm=e.dp_clip, num_sampled_clients=num_sampled
        )
    return strategy


# ---- strategy state for checkpoints: the numpy attributes Flower's strategies keep between rounds ----

_STATE_ATTRS = ("current_arrays", "momentum_vector", "m_t", "v_t")


def strategy_state(strategy: Strategy) -> dict[str, torch.Tensor]:
    """Every array the strategy (and what it wraps) carries from round to round, by a flat name."""
    inner = getattr(strategy, "strategy", strategy)  # DP wrappers hold the real strategy
    out: dict[str, torch.Tensor] = {}
    if isinstance(inner, Scaffold):
        out.update({f"scaffold.{k}": v for k, v in inner.state_tensors().items()})
    for name in _STATE_ATTRS:
        value = getattr(inner, name, None)
        if value is None:
            continue
        if isinstance(value, ArrayRecord):
            value = {k: v.numpy() for k, v in value.items()}
        items = value.items() if isinstance(value, dict) else enumerate(value)
        kind = "dict" if isinstance(value, dict) else "list"
        for k, v in items:
            out[f"{name}.{kind}.{k}"] = torch.from_numpy(v.copy())
    return out


def load_strategy_state(strategy: Strategy, tensors: dict[str, torch.Tensor]) -> None:
    inner = getattr(strategy, "strategy", strategy)
    if isinstance(inner, Scaffold):
        inner.load_state_tensors({k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("scaffold.")})
    for name in _STATE_ATTRS:
        keys = sorted((k for k in tensors if k.startswith(f"{name}.")), key=lambda k: k.split(".", 2)[2])
        if not keys:
            continue
        kind = keys[0].split(".", 2)[1]
        if kind == "dict":
            value = {k.split(".", 2)[2]: tensors[k].numpy() for k in keys}
            if name == "current_arrays" and isinstance(inner, FedAvgM):
                value = wire.to_record(**{k: torch.from_numpy(v) for k, v in value.items()})
        else:
            value = [tensors[k].numpy() for k in sorted(keys, key=lambda k: int(k.split(".", 2)[2]))]
        setattr(inner, name, value)
