"""Config → task, topology, communicator and algorithm. Every engine builds its pieces here."""

from __future__ import annotations

import json

import torch

from distdpo.algorithms.centralized import Centralized
from distdpo.algorithms.compression import Compressor, Uplink, resolve_feedback
from distdpo.algorithms.decentralized import Decentralized
from distdpo.algorithms.federated import Federated
from distdpo.algorithms.gossip import CompressedGossip
from distdpo.algorithms.lora import RankMasks, client_ranks, rank_masks
from distdpo.algorithms.optim import ClientOptimizer, ServerOptimizer
from distdpo.config import (
    ALGORITHM_SPECS,
    DECENTRALIZED,
    Config,
    ConfigError,
    max_lora_rank,
    resolve_server_optimizer,
)
from distdpo.data.synthetic import make_synthetic
from distdpo.policies import LogLinearPolicy, MLPPolicy
from distdpo.tasks.features import FeatureTask
from distdpo.topology import Topology, TopologyError, make_topology


def torch_dtype(cfg: Config) -> torch.dtype:
    return {"float32": torch.float32, "float64": torch.float64}[cfg.engine.dtype]


def device(cfg: Config) -> torch.device:
    if cfg.engine.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.engine.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("engine.device = 'cuda' but no CUDA device is available (use 'auto' or 'cpu')")
    return torch.device(cfg.engine.device)


def task_key(cfg: Config) -> tuple:
    """Runs whose configs share this key share the same task (data, policy, loss). ``freeze_a`` is part of it: it
    takes the LoRA A matrices out of the policy's trainable vector."""
    return (
        cfg.seed,
        json.dumps(vars(cfg.data), sort_keys=True),
        json.dumps(vars(cfg.policy), sort_keys=True),
        cfg.engine.dtype,
        cfg.engine.device,
        cfg.algorithm.lora_aggregation == "freeze_a",
    )


def build_task(cfg: Config):
    """The workload of ``cfg``: the synthetic feature model, the log-linear policy on text features, or a language
    model on text pairs."""
    if cfg.policy.kind == "causal_lm":
        return build_text_task(cfg)
    if cfg.data.source != "synthetic":
        return build_text_feature_task(cfg)
    d, p = cfg.data, cfg.policy
    data = make_synthetic(
        num_clients=d.num_clients,
        pairs_per_client=d.pairs_per_client,
        eval_pairs_per_client=d.eval_pairs_per_client,
        dim=d.dim,
        num_actions=d.num_actions,
        heterogeneity=d.heterogeneity,
        label_noise=d.label_noise,
        size_skew=d.size_skew,
        reward_scale=d.reward_scale,
        reference_scale=d.reference_scale,
        seed=cfg.seed,
    )
    if p.kind == "loglinear":
        policy, reference = LogLinearPolicy(d.dim), data.theta_ref  # the behaviour policy is the reference
    else:
        policy = MLPPolicy(d.dim, p.hidden_size)
        reference = policy.init_params(torch.Generator().manual_seed(cfg.seed + 3))
    return feature_task(cfg, data, policy, reference)


def feature_task(cfg: Config, data, policy, reference: torch.Tensor) -> FeatureTask:
    """DPO of ``policy`` on featurized pairs, with ``cfg``'s loss, dtype and device."""
    p = cfg.policy
    return FeatureTask(
        data,
        policy,
        reference,
        beta=p.beta,
        loss_type=p.loss_type,
        label_smoothing=p.label_smoothing,
        dtype=torch_dtype(cfg),
        device=device(cfg),
    )


def aggregation(cfg: Config) -> str:
    a = cfg.algorithm.aggregation
    if a == "auto":
        return "uniform" if cfg.algorithm.name in DECENTRALIZED else "size"
    return a


def client_weights(cfg: Config, sizes: torch.Tensor) -> torch.Tensor:
    """p_i of f = Σ p_i f_i: proportional to |D_i| or uniform (float64, sums to 1)."""
    if aggregation(cfg) == "uniform":
        return torch.full((len(sizes),), 1.0 / len(sizes), dtype=torch.float64)
    s = sizes.to(torch.float64)
    return s / s.sum()


def num_clients_known(cfg: Config) -> bool:
    """False when the client count comes from the data (one client per value of a column)."""
    return cfg.data.source == "synthetic" or cfg.data.partition != "natural"


def data_stays_at_sites(cfg: Config) -> bool:
    """Per-site data on an engine where each process reads only its own sites' files: nothing may build the whole
    task (the simulator, one process, reads every site's files and says so)."""
    return cfg.data.source == "local" and cfg.engine.name != "simulation"


def build_topology(cfg: Config, num_nodes: int | None = None) -> Topology | None:
    """The gossip graph of a decentralized run over ``num_nodes`` (default: ``data.num_clients``)."""
    if cfg.algorithm.name not in DECENTRALIZED:
        return None
    t = cfg.topology
    try:
        return make_topology(
            t.graph,
            num_nodes or cfg.data.num_clients,
            weights=t.weights,
            seed=cfg.seed,
            er_p=t.er_p or None,
            matrix=t.matrix or None,
        )
    except TopologyError as e:
        raise ConfigError(f"topology: {e}") from None


def batch_size(cfg: Config) -> int | None:
    return None if cfg.algorithm.batch_size == "full" else int(cfg.algorithm.batch_size)


def warnings_for(cfg: Config, task) -> list[str]:
    """What a run silently does that its user may not expect: settings it ignores, data it cannot use as asked."""
    from distdpo.config import TopologyConfig

    out = []
    a = cfg.algorithm
    if a.name not in DECENTRALIZED and cfg.topology != TopologyConfig():
        out.append(
            f"topology.* keys are set, but algorithm.name = {a.name!r} has no communication graph: they are ignored"
        )
    if cfg.engine.save_node_models and (a.name not in DECENTRALIZED or cfg.policy.kind != "causal_lm"):
        out.append(
            "engine.save_node_models is set, but only a decentralized causal-LM run has node models to export: "
            "it is ignored"
        )
    if a.compression != "none" and a.name == "centralized":
        out.append("algorithm.compression is set, but a centralized run communicates nothing: it is ignored")
    if a.keep_client_optimizer_state and (a.optimizer == "sgd" or a.name == "centralized"):
        out.append("algorithm.keep_client_optimizer_state is set, but no client optimizer state restarts: no effect")
    bs = batch_size(cfg)
    names = task.client_names
    small = [name for name, size in zip(names, task.client_sizes.tolist()) if bs is not None and bs > size]
    if small:
        out.append(
            f"algorithm.batch_size = {bs} exceeds the training pairs of {len(small)} client(s) "
            f"({', '.join(map(str, small[:5]))}{', ...' if len(small) > 5 else ''}): they sample with replacement"
        )
    stats = task.data_stats
    total = stats.get("tokenized_pairs", 0)
    for what in ("prompts", "completions"):
        if total and stats.get(f"truncated_{what}") == total:
            out.append(f"every pair's {what[:-1]} was truncated to fit policy.max_length = {cfg.policy.max_length}")
    if cfg.data.eval_fraction > 0:
        none = [name for name, size in zip(names, task.held_out_sizes()) if size == 0]
        if none:
            out.append(
                f"{len(none)} client(s) have no held-out pairs ({', '.join(map(str, none[:5]))}): "
                "pref_accuracy leaves them out"
            )
    return out


def build_algorithm(cfg: Config, task, comm, topology: Topology | None, weights: torch.Tensor):
    """The algorithm object of ``cfg.algorithm.name``, as its entry in ``config.ALGORITHM_SPECS`` describes it."""
    from distdpo import metrics  # (it imports this module)

    a = cfg.algorithm
    spec = ALGORITHM_SPECS[a.name]
    opt = ClientOptimizer(a.optimizer, a.lr, a.weight_decay)
    common = {
        "local_steps": a.local_steps,
        "optimizer": opt,
        "batch_size": batch_size(cfg),
        "seed": cfg.seed,
        "dtype": torch_dtype(cfg),
    }
    if spec.family == "centralized":
        return Centralized(task, weights=weights, **common)
    common["keep_optimizer_state"] = a.keep_client_optimizer_state
    feedback = resolve_feedback(a.compression, a.error_feedback)
    memory = feedback != "none" or spec.choco  # error feedback, or CHOCO's public copies: Q must be contractive
    compressor = Compressor(a.compression, task.num_params, torch_dtype(cfg), contractive=memory)
    if spec.family == "decentralized":
        gossip = None
        if spec.choco or a.compression != "none":
            if topology.time_varying:
                raise ConfigError(
                    f"algorithm.compression = {a.compression!r} / algorithm.name = {a.name!r}: compressed gossip keeps "
                    "public copies of the neighbours' rows and needs a fixed graph, not a time-varying one"
                )
            theta0 = task.initial_params().to(torch_dtype(cfg))
            gamma = a.consensus_lr if spec.choco else None
            gossip = CompressedGossip(
                comm, topology, compressor, theta0, memory=memory, consensus_lr=gamma, seed=cfg.seed
            )
        return Decentralized(task, comm, topology, tracking=spec.tracking, gossip=a.gossip, compressed=gossip, **common)
    uplink = None
    if a.compression != "none":
        uplink = Uplink(compressor, feedback, comm, seed=cfg.seed, device=device(cfg))
    server = ServerOptimizer(resolve_server_optimizer(a), a.server_lr, a.server_momentum, a.server_beta2, a.server_tau)
    return Federated(
        task,
        comm,
        weights=weights,
        server=server,
        clients_per_round=a.clients_per_round or task.num_clients,
        staleness=a.staleness,
        prox_mu=a.mu if spec.prox else 0.0,
        scaffold=spec.scaffold,
        uplink=uplink,
        lora_aggregation=a.lora_aggregation,
        rank_masks=lora_rank_masks(cfg, task),
        measured=lambda r: metrics.evaluated(cfg, r),
        **common,
    )


def build_text_task(cfg: Config, split=None, client_sizes: list[int] | None = None):
    """Load text pairs, split them across clients, tokenize, and wrap a causal LM policy around them.

    ``split``: the pairs this process holds (default: :func:`text_split`, every client's); ``client_sizes``: every
    client's training-pair count when ``split`` holds only some clients (per-site data on torch.distributed ranks).
    """
    import numpy as np

    from distdpo.lm.logprobs import tokenize_pairs
    from distdpo.lm.policy import CausalLMPolicy, load_model_and_tokenizer
    from distdpo.lm.pretrained import load_reference
    from distdpo.tasks.text import TextTask

    p = cfg.policy
    split = split or text_split(cfg)
    data, train, held_out = split.data, split.train, split.eval
    train_ids = np.concatenate(train)
    texts = [t for i in train_ids for t in (data.prompt[i], data.chosen[i], data.rejected[i])]
    model, tokenizer = load_model_and_tokenizer(
        p.model, training_texts=texts, vocab_size=p.tokenizer_vocab_size, seed=cfg.seed
    )
    pairs = tokenize_pairs(tokenizer, data.prompt, data.chosen, data.rejected, p.max_length)
    policy = CausalLMPolicy(
        model,
        tokenizer,
        lora_r=max_lora_rank(p.lora_r),
        lora_alpha=p.lora_alpha,
        lora_dropout=p.lora_dropout,
        target_modules=p.lora_target_modules or None,
        device=device(cfg),
        seed=cfg.seed,
        reference=load_reference(p.reference_model, tokenizer) if p.reference_model else None,
        freeze_a=cfg.algorithm.lora_aggregation == "freeze_a",
    )
    task = TextTask(
        policy,
        pairs,
        train,
        held_out,
        split.names,
        beta=p.beta,
        loss_type=p.loss_type,
        label_smoothing=p.label_smoothing,
        loss_pairs_per_client=cfg.data.loss_pairs_per_client,
        client_sizes=client_sizes,
    )
    # The loader's counts keep their names ("pairs" = pairs loaded); tokenization's are prefixed.
    task.data_stats = {**split.stats, **{f"tokenized_{k}" if k == "pairs" else k: v for k, v in pairs.stats.items()}}
    if p.precompute_reference:
        task.data_stats["reference_logps"] = task.precompute_reference()
    return task


def client_lora_ranks(cfg: Config, task) -> list[int] | None:
    """Each client's LoRA rank when ``policy.lora_r`` gives them different ranks (None: one rank for all)."""
    if cfg.policy.kind != "causal_lm":
        return None
    return client_ranks(cfg.policy.lora_r, task.client_sizes.tolist())


def lora_rank_masks(cfg: Config, task) -> RankMasks | None:
    """The entries of the flat vector each client's adapter holds (:func:`distdpo.algorithms.lora.rank_masks`)."""
    ranks = client_lora_ranks(cfg, task)
    return None if ranks is None else rank_masks(task.lora_layout(), task.num_params, ranks)


def text_split(cfg: Config):
    """The config's text pairs split over clients (:func:`distdpo.data.split.split_text_data`), checked against
    ``algorithm.clients_per_round``."""
    from distdpo.data.sites import local_split
    from distdpo.data.split import split_text_data

    split = local_split(cfg) if cfg.data.source == "local" else split_text_data(cfg)
    if cfg.algorithm.clients_per_round > len(split.train):
        raise ConfigError(
            f"algorithm.clients_per_round = {cfg.algorithm.clients_per_round} exceeds the {len(split.train)} clients "
            "of this split"
        )
    return split


def build_text_feature_task(cfg: Config) -> FeatureTask:
    """Text pairs split over clients as :func:`build_text_task` splits them, featurized for the log-linear policy
    (statistics from the training pairs only), with the reference uniform over each pair."""
    import numpy as np

    from distdpo.data.text_features import pair_features, text_feature_data

    p = cfg.policy
    split = text_split(cfg)
    kind = "hashed" if p.features == "auto" else p.features
    lm = {"model": p.model, "max_length": p.max_length, "vocab_size": p.tokenizer_vocab_size, "seed": cfg.seed}
    phi_w, phi_l = pair_features(
        kind,
        split.data.prompt,
        split.data.chosen,
        split.data.rejected,
        np.concatenate(split.train),
        p.feature_dim,
        **(lm if kind == "lm" else {}),
    )
    data = text_feature_data(phi_w, phi_l, split.train, split.eval)
    task = feature_task(cfg, data, LogLinearPolicy(p.feature_dim), data.theta_ref)
    task.client_names, task.data_stats = list(split.names), dict(split.stats)
    return task
