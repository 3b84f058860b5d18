"""Experiment configuration: TOML → validated dataclasses, ``--set`` overrides and ``[sweep]`` products.

Every key is checked before any work starts; an unknown key or a bad value
raises :class:`ConfigError` naming the key (``algorithm.lr``) and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ALGORITHMS = (
    "centralized", "fedavg", "fedprox", "scaffold", "fedavgm", "fedadam", "fedyogi", "fedadagrad",
    "dsgd", "gradient_tracking",
)
FEDERATED = ("fedavg", "fedprox", "scaffold", "fedavgm", "fedadam", "fedyogi", "fedadagrad")
DECENTRALIZED = ("dsgd", "gradient_tracking")


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key."""


@dataclass
class DataConfig:
    source: str = "synthetic"
    num_clients: int = 16
    pairs_per_client: int = 200
    eval_pairs_per_client: int = 200
    size_skew: float = 0.0  # 0 = equal client sizes; σ of log-normal sizes otherwise
    dim: int = 16
    num_actions: int = 8
    heterogeneity: float = 1.0
    label_noise: float = 0.0
    reward_scale: float = 2.0
    reference_scale: float = 0.5
    # Text preference data (data.source = a file path or a Hugging Face dataset id).
    format: str = "auto"  # auto | trl | hh-rlhf | pandalm | shp | ultrafeedback
    split: str = ""  # Hugging Face split ("" = train)
    on_error: str = "raise"  # raise | skip (malformed records)
    pandalm_mode: str = "votes"  # votes | majority
    max_pairs: int = 0  # 0 = all; else a seeded random subset
    partition: str = "iid"  # iid | dirichlet | natural | quantity
    label_column: str = ""
    dirichlet_alpha: float = 0.5
    quantity_alpha: float = 1.0
    eval_fraction: float = 0.1
    loss_pairs_per_client: int = 16  # fixed training pairs per client for the global loss / gradient metrics


@dataclass
class PolicyConfig:
    kind: str = "loglinear"  # loglinear | mlp | causal_lm
    beta: float = 1.0
    loss_type: str = "sigmoid"  # sigmoid | ipo | hinge | robust
    label_smoothing: float = 0.0
    hidden_size: int = 32  # mlp
    # Causal language models.
    model: str = "builtin:gpt2-tiny"  # builtin:gpt2-tiny | builtin:llama-tiny | local path | hub id
    max_length: int = 256
    lora_r: int = 8  # 0 = full fine-tuning
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: list = field(default_factory=list)  # [] = peft's default for the architecture
    precompute_reference: bool = False
    tokenizer_vocab_size: int = 4096  # built-in models: BPE vocabulary trained on the training text


@dataclass
class AlgorithmConfig:
    name: str = "fedavg"
    rounds: int = 50
    local_steps: int = 5
    lr: float = 0.5
    server_lr: float = 1.0
    clients_per_round: int = 0  # 0 = every client, every round
    staleness: int = 0  # q_max
    batch_size: int | str = 32  # or "full"
    aggregation: str = "auto"  # auto | size | uniform
    optimizer: str = "sgd"  # sgd | adamw
    weight_decay: float = 0.0
    mu: float = 0.01  # FedProx
    server_optimizer: str = "auto"  # auto | sgd | avgm | adagrad | adam | yogi
    server_momentum: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3
    gossip: str = "atc"  # atc | cta


@dataclass
class TopologyConfig:
    graph: str = "ring"
    weights: str = "metropolis"
    er_p: float = 0.0  # 0 = 2 ln(n)/n
    matrix: str = ""  # path to a user-given mixing matrix (.npy / .csv)


@dataclass
class EngineConfig:
    name: str = "simulation"
    device: str = "cpu"  # cpu | cuda | auto
    dtype: str = "float32"  # float32 | float64
    eval_every: int = 1
    sparse_mix: str = "auto"  # auto | dense | sparse
    progress: bool = True
    # Engine "flower" (checkpoint_* may serve other engines too).
    checkpoint_every: int = 0  # save global model + server state every N rounds (0 = never)
    checkpoint_dir: str = ""  # checkpoints go to <checkpoint_dir>/<run label>/; an existing one is resumed
    dp_clip: float = 0.0  # Flower's DP fixed clipping of client updates (0 = off)
    dp_noise: float = 0.0  # Gaussian noise multiplier of that DP wrapper
    dp_side: str = "server"  # server | client: where the clipping happens
    flower_cpus: int = 0  # CPUs Ray may use in Flower's simulation (0 = all)
    flower_timeout: float = 600.0  # seconds to wait for SuperNodes and their replies
    # Engine "torchdist" (torch.distributed ranks, launched with torchrun / distdpo launch).
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | gloo | nccl
    timeout_s: float = 60.0  # a rank silent this long fails the job, naming the rank


@dataclass
class Config:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    sweep: dict[str, list] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(Config) if f.name not in ("seed", "sweep")}

CHOICES = {
    "data.format": ("auto", "trl", "hh-rlhf", "pandalm", "shp", "ultrafeedback"),
    "data.on_error": ("raise", "skip"),
    "data.pandalm_mode": ("votes", "majority"),
    "data.partition": ("iid", "dirichlet", "natural", "quantity"),
    "policy.kind": ("loglinear", "mlp", "causal_lm"),
    "policy.loss_type": ("sigmoid", "ipo", "hinge", "robust"),
    "algorithm.name": ALGORITHMS,
    "algorithm.aggregation": ("auto", "size", "uniform"),
    "algorithm.optimizer": ("sgd", "adamw"),
    "algorithm.server_optimizer": ("auto", "sgd", "avgm", "adagrad", "adam", "yogi"),
    "algorithm.gossip": ("atc", "cta"),
    "topology.weights": ("metropolis", "max_degree", "lazy_metropolis", "lazy_max_degree"),
    "engine.name": ("simulation", "flower", "torchdist"),
    "engine.backend": ("auto", "gloo", "nccl"),
    "engine.dp_side": ("server", "client"),
    "engine.device": ("cpu", "cuda", "auto"),
    "engine.dtype": ("float32", "float64"),
    "engine.sparse_mix": ("auto", "dense", "sparse"),
}
POSITIVE = {
    "data.num_clients", "data.pairs_per_client", "data.eval_pairs_per_client", "data.dim", "policy.beta",
    "policy.hidden_size", "policy.max_length", "policy.lora_alpha", "policy.tokenizer_vocab_size",
    "data.dirichlet_alpha", "data.quantity_alpha", "data.loss_pairs_per_client", "algorithm.rounds", "algorithm.local_steps", "algorithm.lr", "algorithm.server_lr",
    "engine.eval_every", "engine.flower_timeout", "engine.timeout_s",
}
NONNEGATIVE = {
    "data.size_skew", "data.heterogeneity", "data.label_noise", "data.reward_scale", "data.reference_scale",
    "policy.label_smoothing", "policy.lora_r", "policy.lora_dropout", "data.max_pairs", "data.eval_fraction",
    "algorithm.clients_per_round", "algorithm.staleness", "algorithm.weight_decay",
    "algorithm.mu", "algorithm.server_momentum", "algorithm.server_beta2", "algorithm.server_tau", "topology.er_p",
    "engine.checkpoint_every", "engine.dp_clip", "engine.dp_noise", "engine.flower_cpus",
}

BELOW_ONE = {"data.eval_fraction", "policy.lora_dropout", "algorithm.server_momentum", "algorithm.server_beta2"}


def _suggest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Check ``value`` against the type of the field's default and the key's constraints."""
    if key == "algorithm.batch_size":
        if value == "full" or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            return value
        raise ConfigError(f"{key} must be a positive integer or \"full\", got {value!r}")
    kind = type(default)
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
    elif kind is str and not isinstance(value, str):
        raise ConfigError(f"{key} must be a string, got {value!r}")
    elif kind is list and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise ConfigError(f"{key} must be a list of strings, got {value!r}")
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"{key} must be one of {', '.join(map(repr, CHOICES[key]))}, got {value!r}{_suggest(str(value), CHOICES[key])}")
    if key in POSITIVE and not value > 0:
        raise ConfigError(f"{key} must be positive, got {value!r}")
    if key in NONNEGATIVE and not value >= 0:
        raise ConfigError(f"{key} must be non-negative, got {value!r}")
    if key in BELOW_ONE and not value < 1:
        raise ConfigError(f"{key} must be below 1, got {value!r}")
    return value


def _set(cfg: Config, key: str, value: Any) -> None:
    parts = key.split(".")
    if len(parts) == 1:
        if key != "seed":
            raise ConfigError(f"unknown config key {key!r}{_suggest(key, ['seed', *SECTIONS])}")
        cfg.seed = _coerce(key, value, 0)
        return
    section, name = parts[0], ".".join(parts[1:])
    if section not in SECTIONS:
        raise ConfigError(f"unknown config section {section!r} in key {key!r}{_suggest(section, SECTIONS)}")
    obj = getattr(cfg, section)
    names = [f.name for f in dataclasses.fields(obj)]
    if name not in names:
        raise ConfigError(f"unknown config key {key!r}{_suggest(name, names)}")
    setattr(obj, name, _coerce(key, value, getattr(type(obj)(), name)))


def flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in table.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """``key.path=value``: the value is read as TOML (``0.1``, ``true``, ``[1, 2]``), else as a string."""
    if "=" not in text:
        raise ConfigError(f"--set expects key.path=value, got {text!r}")
    key, raw = (s.strip() for s in text.split("=", 1))
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def from_dict(table: dict[str, Any], overrides: list[tuple[str, Any]] = ()) -> Config:
    """Build and validate a config from a TOML-shaped table plus ``(key, value)`` overrides."""
    cfg = Config()
    table = dict(table)
    sweep = table.pop("sweep", {}) or {}
    for key, value in flatten(table).items():
        _set(cfg, key, value)
    for key, value in overrides:
        if key.startswith("sweep."):
            sweep[key[len("sweep."):]] = value
        else:
            _set(cfg, key, value)
    cfg.sweep = {}
    for key, values in flatten(sweep).items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep key {key!r} must be a non-empty list of values, got {values!r}")
        for v in values:
            _set(Config(), key, v)  # validates the key and each value
        cfg.sweep[key] = values
    for run_cfg in expand(cfg).values():
        validate(run_cfg)
    return cfg


def load(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a TOML config file and apply ``--set`` overrides."""
    path = Path(path)
    try:
        table = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    return from_dict(table, [parse_override(o) for o in overrides])


def expand(cfg: Config) -> dict[str, Config]:
    """One config per combination of the ``[sweep]`` values, keyed by a run label."""
    if not cfg.sweep:
        return {"run": dataclasses.replace(cfg, sweep={})}
    keys = list(cfg.sweep)
    runs: dict[str, Config] = {}
    for combo in itertools.product(*(cfg.sweep[k] for k in keys)):
        run = from_dict({k: v for k, v in cfg.to_dict().items() if k != "sweep"}, list(zip(keys, combo)))
        label = ",".join(f"{k.split('.')[-1]}={v}" for k, v in zip(keys, combo))
        runs[label] = run
    return runs


def validate(cfg: Config) -> None:
    """Cross-field checks that a single key's type cannot express."""
    a, d = cfg.algorithm, cfg.data
    if a.clients_per_round > d.num_clients:
        raise ConfigError(f"algorithm.clients_per_round = {a.clients_per_round} exceeds data.num_clients = {d.num_clients}")
    if a.name in DECENTRALIZED and a.aggregation == "size":
        raise ConfigError(
            "algorithm.aggregation = 'size' is impossible for decentralized algorithms: gossip with a doubly "
            "stochastic W minimizes the uniform average of the clients' losses (use 'auto' or 'uniform')"
        )
    if a.name in ("scaffold", "gradient_tracking") and a.optimizer != "sgd":
        raise ConfigError(f"algorithm.optimizer = {a.optimizer!r}: {a.name} needs 'sgd' (its corrections assume SGD steps)")
    if cfg.engine.name == "flower" and (a.name not in FEDERATED or a.staleness):
        raise ConfigError(
            f"engine.name = 'flower' runs the federated algorithms ({', '.join(FEDERATED)}) without staleness, got "
            f"algorithm.name = {a.name!r}, algorithm.staleness = {a.staleness} (Flower's strategies apply the returned "
            "models to the current global model; use the simulator for decentralized or stale runs)"
        )
    if cfg.engine.checkpoint_every and not cfg.engine.checkpoint_dir:
        raise ConfigError("engine.checkpoint_every > 0 needs engine.checkpoint_dir (where checkpoints are written)")
    if a.staleness and a.name not in FEDERATED:
        raise ConfigError(f"algorithm.staleness applies to federated algorithms, not {a.name!r}")
    if d.label_noise >= 0.5:
        raise ConfigError(f"data.label_noise must be below 0.5, got {d.label_noise}")
    if cfg.policy.label_smoothing and cfg.policy.loss_type in ("hinge", "ipo"):
        raise ConfigError(
            f"policy.label_smoothing = {cfg.policy.label_smoothing} has no meaning for policy.loss_type = "
            f"{cfg.policy.loss_type!r}; it applies to 'sigmoid' (cDPO) and 'robust' (set it to 0 or change the loss)"
        )
    if a.name == "gradient_tracking" and a.gossip != "atc":
        raise ConfigError(
            "algorithm.gossip = 'cta' is for DSGD; gradient tracking mixes its parameters and its tracker in one "
            "adapt-then-combine step (leave algorithm.gossip = 'atc')"
        )
    if cfg.policy.label_smoothing >= 0.5:
        raise ConfigError(f"policy.label_smoothing must be below 0.5, got {cfg.policy.label_smoothing}")
    if d.num_actions < 2:
        raise ConfigError(f"data.num_actions must be at least 2, got {d.num_actions}")
    text = d.source != "synthetic"
    if text != (cfg.policy.kind == "causal_lm"):
        raise ConfigError(
            f"policy.kind = {cfg.policy.kind!r} does not fit data.source = {d.source!r}: text preference data needs "
            "policy.kind = 'causal_lm', and the synthetic model needs 'loglinear' or 'mlp'"
        )
    if text and cfg.policy.max_length < 8:
        raise ConfigError(f"policy.max_length = {cfg.policy.max_length} cannot hold a prompt token and a completion: "
                          "use at least 8 (tokens of prompt + completion)")
    if not d.eval_fraction < 1:
        raise ConfigError(f"data.eval_fraction must be below 1, got {d.eval_fraction}")
    if d.partition in ("dirichlet", "natural") and text and not d.label_column:
        raise ConfigError(f"data.partition = {d.partition!r} needs data.label_column (the column to split by)")
    if cfg.topology.er_p > 1:
        raise ConfigError(f"topology.er_p must be a probability, got {cfg.topology.er_p}")
