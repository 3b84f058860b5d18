"""Experiment configuration: TOML → validated dataclasses, ``--set`` overrides and ``[sweep]`` products.

Every key is checked before any work starts; an unknown key or a bad value
raises :class:`ConfigError` naming the key (``algorithm.lr``) and what was expected.

Each key is one dataclass field made by :func:`option`: its default, a one-line
doc, the values it accepts (choices, bounds) and, for engine-specific keys, the
engine it configures, all in the field's metadata. :func:`_coerce` checks a value
against that metadata; :func:`distdpo.validation.validate` holds the checks that involve several keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distdpo.data.partition import PARTITIONS
from distdpo.data.text import FORMATS, ON_ERROR, PANDALM_MODES
from distdpo.engines import ENGINES


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key."""


# ---- algorithms: one registry that config validation, build.build_algorithm and the Flower strategies read ----


@dataclass(frozen=True)
class AlgorithmSpec:
    """What an ``algorithm.name`` means to the code that builds and runs it."""

    family: str  # centralized | federated | decentralized
    server_optimizer: str = "sgd"  # federated: the server step that algorithm.server_optimizer = "auto" stands for
    prox: bool = False  # FedProx's proximal term (algorithm.mu)
    scaffold: bool = False  # SCAFFOLD's control variates
    tracking: bool = False  # gradient tracking's tracker
    choco: bool = False  # CHOCO-SGD: compressed differences to public copies and a consensus step

    @property
    def sgd_only(self) -> bool:
        """Its corrections assume plain SGD steps on the clients."""
        return self.scaffold or self.tracking


FAMILIES = ("centralized", "federated", "decentralized")
# = distdpo.algorithms.optim.SERVER_OPTIMIZERS
SERVER_OPTIMIZERS = ("sgd", "avgm", "nesterov", "adagrad", "adam", "yogi")
ALGORITHM_SPECS: dict[str, AlgorithmSpec] = {
    "centralized": AlgorithmSpec("centralized"),
    "fedavg": AlgorithmSpec("federated"),
    "fedprox": AlgorithmSpec("federated", prox=True),
    "scaffold": AlgorithmSpec("federated", scaffold=True),
    "fedavgm": AlgorithmSpec("federated", server_optimizer="avgm"),
    "fedadam": AlgorithmSpec("federated", server_optimizer="adam"),
    "fedyogi": AlgorithmSpec("federated", server_optimizer="yogi"),
    "fedadagrad": AlgorithmSpec("federated", server_optimizer="adagrad"),
    "dsgd": AlgorithmSpec("decentralized"),
    "gradient_tracking": AlgorithmSpec("decentralized", tracking=True),
    "choco": AlgorithmSpec("decentralized", choco=True),
}
ALGORITHMS = tuple(ALGORITHM_SPECS)
FEDERATED = tuple(name for name, spec in ALGORITHM_SPECS.items() if spec.family == "federated")
DECENTRALIZED = tuple(name for name, spec in ALGORITHM_SPECS.items() if spec.family == "decentralized")


def resolve_server_optimizer(a: AlgorithmConfig) -> str:
    """The server step of a federated run: ``algorithm.server_optimizer``, or the algorithm's own for ``"auto"``."""
    return a.server_optimizer if a.server_optimizer != "auto" else ALGORITHM_SPECS[a.name].server_optimizer


# ---- choices owned by modules too heavy to import here (torch, networkx); tests check they agree ----

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")  # distdpo.losses imports it from here
CLIENT_OPTIMIZERS = ("sgd", "adamw")  # = distdpo.algorithms.optim.CLIENT_OPTIMIZERS
LORA_MODES = ("factors", "freeze_a", "product")  # distdpo.algorithms.lora
MIXING_WEIGHTS = ("metropolis", "max_degree", "lazy_metropolis", "lazy_max_degree")  # = distdpo.topology.WEIGHTS
TEXT_FEATURES = ("hashed", "lm")  # = distdpo.data.text_features.FEATURE_KINDS
COMPRESSORS = ("none", "topk", "randk", "int8", "qsgd")  # the forms distdpo.algorithms.compression encodes


def lora_rank_spec(key: str, value: Any) -> int | list[int] | str:
    """``policy.lora_r``: one rank for every client, a list of ranks (one per client), or ``"by_size:MIN-MAX"``."""

    def rank(v: Any, least: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= least

    if rank(value, 0) or (isinstance(value, list) and value and all(rank(v, 1) for v in value)):
        return value
    text = value if isinstance(value, str) else ""
    low, dash, high = text.removeprefix("by_size:").partition("-")
    if text.startswith("by_size:") and dash and low.isdigit() and high.isdigit() and 0 < int(low) <= int(high):
        return value
    raise ConfigError(
        f'{key} must be a non-negative integer, a list of positive integers (one rank per client) or "by_size:MIN-MAX" '
        f"(1 ≤ MIN ≤ MAX), got {value!r}"
    )


def max_lora_rank(lora_r: int | list[int] | str) -> int:
    """The largest rank of ``policy.lora_r``: the rank of the shared adapter every client's lies inside."""
    if isinstance(lora_r, int):
        return lora_r
    return max(lora_r) if isinstance(lora_r, list) else int(lora_r.rpartition("-")[2])


def option(
    default: Any,
    doc: str,
    *,
    choices: tuple | None = None,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    or_values: tuple = (),
    engine: str | None = None,
    parse=None,
):
    """A config key: its default, a one-line doc and the values it accepts, as a dataclass field.

    ``choices``: the allowed values; ``gt`` / ``ge`` / ``lt``: bounds (``gt=0`` positive, ``ge=0``
    non-negative, ``lt=1`` below 1); floats must also be finite. ``or_values``: values accepted besides
    numbers within the bounds (``"full"`` for a batch size). ``engine``: the only engine that reads the key.
    ``parse``: a key of several forms checks its value with ``parse(key, value)`` instead.
    """
    meta = {
        "doc": doc,
        "type": type(default),
        "choices": None if choices is None else tuple(choices),
        "gt": gt,
        "ge": ge,
        "lt": lt,
        "or_values": tuple(or_values),
        "engine": engine,
        "parse": parse,
    }
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    source: str = option(
        "synthetic", '"synthetic" (the personalized preference model), a file, a hub id, or "local" (per-site files)'
    )
    # data.source = "local": each site reads its own files (see distdpo.data.sites).
    site_data: str = option("", "a `distdpo split` directory, or a path template with {client}")
    site_eval: str = option("", "held-out files, a template with {client} ('' = eval.jsonl beside, else split off)")
    clients: list = option([], "the site names a {client} template is filled with")  # noqa: RUF009
    num_clients: int = option(16, "n users", gt=0)
    pairs_per_client: int = option(200, "mean training pairs per user", gt=0)
    eval_pairs_per_client: int = option(200, "held-out pairs per user", gt=0)
    size_skew: float = option(0.0, "0 = equal client sizes; σ of log-normal sizes otherwise", ge=0)
    dim: int = option(16, "feature dimension d", gt=0)
    num_actions: int = option(8, "actions per context", ge=2)
    heterogeneity: float = option(1.0, "θ_i = θ★ + heterogeneity · u_i", ge=0)
    label_noise: float = option(0.0, "probability a Bradley–Terry label is flipped", ge=0, lt=0.5)
    reward_scale: float = option(2.0, "‖θ★‖ (≈ reward spread)", ge=0)
    reference_scale: float = option(0.5, "‖θ_ref‖ of the behaviour / reference policy", ge=0)
    # Text preference data (data.source = a file path or a Hugging Face dataset id).
    format: str = option("auto", 'record format of the preference data ("auto" detects it)', choices=FORMATS)
    split: str = option("", 'Hugging Face split ("" = train)')
    on_error: str = option("raise", "malformed records: raise, or skip and count them", choices=ON_ERROR)
    pandalm_mode: str = option("votes", "PandaLM: one pair per annotator vote, or the majority", choices=PANDALM_MODES)
    max_pairs: int = option(0, "a seeded random subset of this many pairs (0 = all)", ge=0)
    partition: str = option("iid", "how pairs are split across clients", choices=PARTITIONS)
    label_column: str = option("", "the column a dirichlet / natural partition splits by")
    dirichlet_alpha: float = option(0.5, "label-skew concentration of the dirichlet partition", gt=0)
    quantity_alpha: float = option(1.0, "size-skew concentration of the quantity partition", gt=0)
    eval_fraction: float = option(0.1, "held-out share of the pairs, drawn by prompt across clients", ge=0, lt=1)
    loss_pairs_per_client: int = option(16, "fixed training pairs per client for the global loss / gradient", gt=0)


@dataclass
class PolicyConfig:
    kind: str = option("loglinear", "policy family; causal_lm for text data", choices=("loglinear", "mlp", "causal_lm"))
    beta: float = option(1.0, "DPO temperature β", gt=0)
    loss_type: str = option("sigmoid", "DPO-family loss", choices=LOSS_TYPES)
    label_smoothing: float = option(0.0, "cDPO ε (sigmoid) / robust-DPO noise rate", ge=0, lt=0.5)
    hidden_size: int = option(32, "MLP width", gt=0)
    # The log-linear policy on text preference data.
    features: str = option(
        "auto",
        "text pairs' φ(x, y): hashed n-grams or a frozen LM's states; auto = hashed",
        choices=("auto", *TEXT_FEATURES),
    )
    feature_dim: int = option(256, "dimension of the text features", gt=0)
    # Causal language models.
    model: str = option(
        "builtin:gpt2-tiny", "builtin:gpt2-tiny | builtin:llama-tiny | local path | hub id | distdpo export directory"
    )
    reference_model: str = option("", "the reference policy: local path, hub id or export ('' = the policy's base)")
    max_length: int = option(256, "tokens of prompt + completion", gt=0)
    lora_r: int | list | str = option(
        8,
        'LoRA rank (0 = full fine-tuning); per client: a list, or "by_size:MIN-MAX" (∝ client size)',
        parse=lora_rank_spec,
    )
    lora_alpha: float = option(16.0, "LoRA scaling", gt=0)
    lora_dropout: float = option(0.0, "LoRA dropout", ge=0, lt=1)
    lora_target_modules: list = option(  # noqa: RUF009 (option gives a list a default_factory)
        [], "modules to adapt ([] = peft's default for the architecture)"
    )
    precompute_reference: bool = option(False, "compute and disk-cache every pair's reference log-probs up front")
    tokenizer_vocab_size: int = option(4096, "built-in models: BPE vocabulary trained on the training text", gt=0)


@dataclass
class AlgorithmConfig:
    name: str = option("fedavg", "the algorithm (see ALGORITHM_SPECS)", choices=ALGORITHMS)
    rounds: int = option(50, "R rounds", gt=0)
    local_steps: int = option(5, "K local steps per round (centralized: steps per round)", gt=0)
    lr: float = option(0.5, "local step size η", gt=0)
    server_lr: float = option(1.0, "server step size η_g", gt=0)
    clients_per_round: int = option(0, "S clients sampled per round (0 = every client, every round)", ge=0)
    staleness: int = option(0, "q_max: a client starts from the global model of up to q_max rounds ago", ge=0)
    batch_size: int | str = option(32, 'pairs per stochastic gradient, or "full"', gt=0, or_values=("full",))
    aggregation: str = option(
        "auto",
        "client weights p_i: ∝ |D_i| (size) or uniform; auto = size if federated",
        choices=("auto", "size", "uniform"),
    )
    optimizer: str = option("sgd", "client optimizer", choices=CLIENT_OPTIMIZERS)
    weight_decay: float = option(0.0, "client weight decay", ge=0)
    mu: float = option(0.01, "FedProx μ", ge=0)
    server_optimizer: str = option(
        "auto", "federated server step; auto follows algorithm.name", choices=("auto", *SERVER_OPTIMIZERS)
    )
    server_momentum: float = option(0.9, "server optimizer β1", ge=0, lt=1)
    server_beta2: float = option(0.99, "server optimizer β2", ge=0, lt=1)
    server_tau: float = option(1e-3, "server optimizer τ (adaptivity)", ge=0)
    gossip: str = option("atc", "DSGD order: adapt-then-combine or combine-then-adapt", choices=("atc", "cta"))
    compression: str = option("none", 'uploads and gossip: "none", "topk:<f>", "randk:<f>", "int8", "qsgd:<levels>"')
    error_feedback: str = option(
        "auto", "sender's error feedback; auto = ef21 for topk and int8", choices=("auto", "none", "ef", "ef21")
    )
    consensus_lr: float = option(0.2, "CHOCO's consensus step size γ (at most 1)", gt=0)
    keep_client_optimizer_state: bool = option(False, "each client's optimizer state persists across rounds")
    lora_aggregation: str = option(
        "factors", "LoRA: average A and B, train B over a frozen A, or re-factor Σ p_i B_i A_i", choices=LORA_MODES
    )


@dataclass
class TopologyConfig:
    graph: str = option("ring", "a named graph (distdpo.topology.GRAPHS) or an edge-list file")
    weights: str = option("metropolis", "mixing-matrix weights", choices=MIXING_WEIGHTS)
    er_p: float = option(0.0, "Erdős–Rényi edge probability (0 = 2 ln(n)/n)", ge=0)
    matrix: str = option("", "path to a user-given mixing matrix (.npy / .csv)")


@dataclass
class EngineConfig:
    name: str = option("simulation", "the engine that runs the algorithm", choices=tuple(ENGINES))
    device: str = option("cpu", "where tensors live", choices=("cpu", "cuda", "auto"))
    dtype: str = option("float32", "dtype parameters are trained, sent and counted in", choices=("float32", "float64"))
    eval_every: int = option(1, "evaluate every k rounds", gt=0)
    sparse_mix: str = option("auto", "simulator gossip as dense or sparse W @ X", choices=("auto", "dense", "sparse"))
    progress: bool = option(True, "progress bar (on terminals)")
    # Every engine: checkpoints.
    checkpoint_every: int = option(0, "save the run's state every N rounds (0 = never)", ge=0)
    checkpoint_dir: str = option("", "checkpoints go to <checkpoint_dir>/<run label>/; an existing one is resumed")
    # Every engine: the exported model of a causal-LM run (models/<run label>/ in the run directory).
    export_every_checkpoint: bool = option(False, "also export the model at every checkpoint, not only at the end")
    save_node_models: bool = option(False, "decentralized runs: also export every node's own model")
    # Engine "flower".
    dp_clip: float = option(0.0, "Flower's DP fixed clipping of client updates (0 = off)", ge=0, engine="flower")
    dp_noise: float = option(0.0, "Gaussian noise multiplier of that DP wrapper", ge=0, engine="flower")
    dp_side: str = option("server", "where the DP clipping happens", choices=("server", "client"), engine="flower")
    flower_cpus: int = option(0, "CPUs Ray may use in Flower's simulation (0 = all)", ge=0, engine="flower")
    flower_timeout: float = option(600.0, "seconds to wait for SuperNodes and their replies", gt=0, engine="flower")
    min_clients: int = option(
        0, "a round goes on when this many of its sampled clients reply (0 = all)", ge=0, engine="flower"
    )
    secure_aggregation: bool = option(False, "sum client updates with Flower's SecAgg+ protocol", engine="flower")
    dp_delta: float = option(1e-5, "δ of the (ε, δ) privacy spent that DP runs report", gt=0, lt=1, engine="flower")
    # Engine "torchdist" (torch.distributed ranks, launched with torchrun / distdpo launch).
    backend: str = option(
        "auto",
        "process-group backend; auto = nccl on CUDA, gloo on CPU",
        choices=("auto", "gloo", "nccl"),
        engine="torchdist",
    )
    timeout_s: float = option(60.0, "a rank silent this long fails the job, naming the rank", gt=0, engine="torchdist")


@dataclass
class Config:
    seed: int = option(0, "seeds data, client sampling and minibatches")
    data: DataConfig = field(default_factory=DataConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    sweep: dict[str, list] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(Config) if f.name not in ("seed", "sweep")}


def _keys() -> dict[str, dataclasses.Field]:
    out = {f.name: f for f in dataclasses.fields(Config) if f.name == "seed"}
    for section, cls in SECTIONS.items():
        out.update({f"{section}.{f.name}": f for f in dataclasses.fields(cls)})
    return out


KEYS: dict[str, dataclasses.Field] = _keys()  # "algorithm.lr" → its field; the metadata says what it accepts


def default(key: str) -> Any:
    """The default value of config key ``key`` (``"algorithm.lr"``)."""
    f = KEYS[key]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _suggest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


_BOUNDS = {"gt": lambda v, limit: v > limit, "ge": lambda v, limit: v >= limit, "lt": lambda v, limit: v < limit}


def _bound(which: str, limit: float) -> str:
    """How a bound reads in a message: ``gt=0`` → "positive", ``ge=0`` → "non-negative", ``lt=1`` → "below 1"."""
    if which == "gt":
        return "positive" if limit == 0 else f"greater than {limit}"
    if which == "ge":
        return "non-negative" if limit == 0 else f"at least {limit}"
    return f"below {limit}"


def _bound_words(spec: Mapping) -> list[str]:
    return [_bound(which, spec[which]) for which in _BOUNDS if spec[which] is not None]


def _coerce(key: str, value: Any, spec: Mapping) -> Any:
    """Check ``value`` against the metadata ``spec`` of key ``key`` (see :func:`option`); return it as stored."""
    if spec["parse"] is not None:
        return spec["parse"](key, value)
    alternatives = spec["or_values"]
    if not alternatives:
        return _check(key, value, spec)
    if isinstance(value, str) and value in alternatives:
        return value
    try:
        return _check(key, value, spec)
    except ConfigError:
        kind = {int: "integer", float: "number"}.get(spec["type"], spec["type"].__name__)
        alts = " or ".join(f'"{v}"' for v in alternatives)
        raise ConfigError(f"{key} must be a {' '.join([*_bound_words(spec), kind])} or {alts}, got {value!r}") from None


def _check(key: str, value: Any, spec: Mapping) -> Any:
    kind = spec["type"]
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
    choices = spec["choices"]
    if choices is not None and value not in choices:
        raise ConfigError(
            f"{key} must be one of {', '.join(map(repr, choices))}, got {value!r}{_suggest(str(value), choices)}"
        )
    for which, holds in _BOUNDS.items():
        limit = spec[which]
        if limit is not None and not holds(value, limit):
            raise ConfigError(f"{key} must be {_bound(which, limit)}, got {value!r}")
    return value


def _set(cfg: Config, key: str, value: Any) -> None:
    parts = key.split(".")
    if len(parts) == 1:
        if key != "seed":
            raise ConfigError(f"unknown config key {key!r}{_suggest(key, ['seed', *SECTIONS])}")
        cfg.seed = _coerce(key, value, KEYS[key].metadata)
        return
    section, name = parts[0], ".".join(parts[1:])
    if section not in SECTIONS:
        raise ConfigError(f"unknown config section {section!r} in key {key!r}{_suggest(section, SECTIONS)}")
    if key not in KEYS:
        names = [f.name for f in dataclasses.fields(SECTIONS[section])]
        raise ConfigError(f"unknown config key {key!r}{_suggest(name, names)}")
    setattr(getattr(cfg, section), name, _coerce(key, value, KEYS[key].metadata))


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
            sweep[key[len("sweep.") :]] = value
        else:
            _set(cfg, key, value)
    cfg.sweep = {}
    for key, values in flatten(sweep).items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep key {key!r} must be a non-empty list of values, got {values!r}")
        for v in values:
            _set(Config(), key, v)  # validates the key and each value
        cfg.sweep[key] = values
    from distdpo.validation import validate  # (it reads these dataclasses)

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
