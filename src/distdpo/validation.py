"""The checks that tie several config keys together (a single key's own values are checked where it is declared,
in :mod:`distdpo.config`); :func:`validate` runs on every run of a sweep before any work starts."""

from __future__ import annotations

import math

from distdpo.algorithms.lora import check_lora_aggregation
from distdpo.config import ALGORITHM_SPECS, COMPRESSORS, FEDERATED, Config, ConfigError, PolicyConfig


def validate(cfg: Config) -> None:
    """Checks that involve several keys (a single key's own values are checked by :func:`_coerce`)."""
    a, d = cfg.algorithm, cfg.data
    spec = ALGORITHM_SPECS[a.name]
    if a.clients_per_round > d.num_clients:
        raise ConfigError(
            f"algorithm.clients_per_round = {a.clients_per_round} exceeds data.num_clients = {d.num_clients}"
        )
    if spec.family == "decentralized" and a.aggregation == "size":
        raise ConfigError(
            "algorithm.aggregation = 'size' is impossible for decentralized algorithms: gossip with a doubly "
            "stochastic W minimizes the uniform average of the clients' losses (use 'auto' or 'uniform')"
        )
    if spec.sgd_only and a.optimizer != "sgd":
        raise ConfigError(
            f"algorithm.optimizer = {a.optimizer!r}: {a.name} needs 'sgd' (its corrections assume SGD steps)"
        )
    if cfg.engine.name == "flower" and (spec.family != "federated" or a.staleness):
        raise ConfigError(
            f"engine.name = 'flower' runs the federated algorithms ({', '.join(FEDERATED)}) without staleness, got "
            f"algorithm.name = {a.name!r}, algorithm.staleness = {a.staleness} (Flower's strategies apply the returned "
            "models to the current global model; use the simulator for decentralized or stale runs)"
        )
    if cfg.engine.export_every_checkpoint and not cfg.engine.checkpoint_every:
        raise ConfigError("engine.export_every_checkpoint needs engine.checkpoint_every > 0 (when to export)")
    if cfg.engine.name == "flower":
        _check_flower(cfg)
    if cfg.engine.checkpoint_every and not cfg.engine.checkpoint_dir:
        raise ConfigError("engine.checkpoint_every > 0 needs engine.checkpoint_dir (where checkpoints are written)")
    if a.staleness and spec.family != "federated":
        raise ConfigError(f"algorithm.staleness applies to federated algorithms, not {a.name!r}")
    if cfg.policy.label_smoothing and cfg.policy.loss_type in ("hinge", "ipo"):
        raise ConfigError(
            f"policy.label_smoothing = {cfg.policy.label_smoothing} has no meaning for policy.loss_type = "
            f"{cfg.policy.loss_type!r}; it applies to 'sigmoid' (cDPO) and 'robust' (set it to 0 or change the loss)"
        )
    if spec.tracking and a.gossip != "atc":
        raise ConfigError(
            "algorithm.gossip = 'cta' is for DSGD; gradient tracking mixes its parameters and its tracker in one "
            "adapt-then-combine step (leave algorithm.gossip = 'atc')"
        )
    text = d.source != "synthetic"
    _check_policy_fits_data(cfg.policy, d.source)
    if cfg.policy.kind == "causal_lm" and cfg.policy.max_length < 8:
        raise ConfigError(
            f"policy.max_length = {cfg.policy.max_length} cannot hold a prompt token and a completion: "
            "use at least 8 (tokens of prompt + completion)"
        )
    if d.source == "local" and cfg.policy.kind != "causal_lm":
        raise ConfigError('data.source = "local" (per-site files) trains policy.kind = "causal_lm"')
    if d.source == "local" and cfg.policy.model.startswith("builtin:"):
        raise ConfigError(
            f'data.source = "local": no process holds the text that policy.model = {cfg.policy.model!r} would train '
            "its tokenizer on; create the model once with `distdpo init-model "
            f'{cfg.policy.model} --tokenizer-text FILE --out DIR` and set policy.model = "DIR"'
        )
    if d.partition in ("dirichlet", "natural") and text and not d.label_column:
        raise ConfigError(f"data.partition = {d.partition!r} needs data.label_column (the column to split by)")
    if cfg.topology.er_p > 1:
        raise ConfigError(f"topology.er_p must be a probability, got {cfg.topology.er_p}")
    _check_compression(cfg)
    check_lora_aggregation(cfg)


def _check_compression(cfg: Config) -> None:
    """algorithm.compression's form, and the algorithms and engines that send compressed messages."""
    a = cfg.algorithm
    name, colon, arg = a.compression.partition(":")
    if name not in COMPRESSORS or bool(colon) != (name in ("topk", "randk", "qsgd")):
        raise ConfigError(
            'algorithm.compression must be "none", "topk:<fraction>", "randk:<fraction>", "int8" or '
            f'"qsgd:<levels>", got {a.compression!r}'
        )
    if name in ("topk", "randk") and not 0 < _number(arg) <= 1:
        raise ConfigError(f"algorithm.compression = {a.compression!r}: the fraction sent must be in (0, 1]")
    if name == "qsgd" and not (arg.isdigit() and 1 <= int(arg) <= 127):
        raise ConfigError(f"algorithm.compression = {a.compression!r}: the levels must be an integer from 1 to 127")
    if a.consensus_lr > 1:
        raise ConfigError(f"algorithm.consensus_lr (CHOCO's γ) must be at most 1, got {a.consensus_lr}")
    spec = ALGORITHM_SPECS[a.name]
    if spec.choco and (a.error_feedback == "none" or a.gossip != "atc"):
        raise ConfigError(
            "algorithm.name = 'choco' gossips compressed differences to public copies (its error feedback) after "
            "the local steps: leave algorithm.error_feedback and algorithm.gossip at their defaults"
        )
    if name != "none" and (spec.scaffold or spec.tracking):
        raise ConfigError(
            f"algorithm.compression = {a.compression!r}: {a.name} needs its messages exact (its control variates or "
            "tracker follow from them); compress fedavg-family, dsgd or choco runs"
        )
    if cfg.engine.name == "flower":
        flower_lacks = {"compression": name != "none", "keep_client_optimizer_state": a.keep_client_optimizer_state}
        flower_lacks["server_optimizer"] = a.server_optimizer == "nesterov"
        for key in (k for k, lacks in flower_lacks.items() if lacks):
            raise ConfigError(f"engine.name = 'flower' does not run algorithm.{key} = {getattr(a, key)!r}")


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def _check_flower(cfg: Config) -> None:
    """engine.min_clients within the round's sample; SecAgg+ where it can sum what the strategy needs (the
    number of clients of a text data set is known once it is read: the Flower server checks again)."""
    a, e = cfg.algorithm, cfg.engine
    if a.clients_per_round and e.min_clients > a.clients_per_round:
        raise ConfigError(
            f"engine.min_clients = {e.min_clients} exceeds algorithm.clients_per_round = {a.clients_per_round}"
        )
    if not e.secure_aggregation:
        return
    if ALGORITHM_SPECS[a.name].scaffold:
        raise ConfigError(
            "engine.secure_aggregation: SCAFFOLD's server needs each client's model to update its c_i, which "
            "SecAgg+ hides (use a FedAvg-family algorithm)"
        )
    if e.dp_clip > 0 and e.dp_side == "server":
        raise ConfigError(
            "engine.secure_aggregation with engine.dp_side = 'server': the server cannot clip updates it never "
            "sees (use engine.dp_side = 'client')"
        )
    if a.clients_per_round == 1 or e.min_clients == 1:
        raise ConfigError(
            "engine.secure_aggregation masks each update with others': it needs algorithm.clients_per_round and "
            "engine.min_clients other than 1"
        )


def _check_policy_fits_data(p: PolicyConfig, source: str) -> None:
    """Text data: a causal LM, or the log-linear policy on text features; the synthetic model: its own features."""
    text = source != "synthetic"
    if (p.kind == "mlp" and text) or (p.kind == "causal_lm" and not text):
        raise ConfigError(
            f"policy.kind = {p.kind!r} does not fit data.source = {source!r}: text preference data needs "
            "policy.kind = 'causal_lm' or 'loglinear' (on text features), and the synthetic model needs 'loglinear' "
            "or 'mlp'"
        )
    if p.features != "auto" and not (text and p.kind == "loglinear"):
        why = "a causal LM reads the text itself" if p.kind == "causal_lm" else "the synthetic model has its own"
        raise ConfigError(
            f"policy.features = {p.features!r} applies to the log-linear policy on text data, not to policy.kind = "
            f"{p.kind!r} with data.source = {source!r} (leave it 'auto': {why})"
        )
