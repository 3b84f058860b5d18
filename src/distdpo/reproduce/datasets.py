"""The datasets the suite runs on: a base config each, the experiments it supports, and the sizes of the suite."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from distdpo.config import ConfigError, from_dict


class DatasetUnavailable(ConfigError):
    """A dataset whose configs this install cannot run yet; the message says what is missing."""


@dataclass
class Scale:
    """Sizes of the suite for one dataset and mode (quick / full)."""

    rounds: int
    eval_every: int
    batch: int
    local_steps: int  # E of experiments A and B5
    local_steps_sweep: list[int]
    long_factor: int  # B1's longer run: long_factor × rounds
    participation: list[int]
    staleness: list[int]
    topologies: list[str]
    gt_rounds: int
    eps_rel: float
    heterogeneity: list[float] = field(default_factory=list)
    num_clients_sweep: list[int] = field(default_factory=list)
    clients_sweep_pairs: int = 50
    clients_sweep_per_round: int = 10
    full: int | str = "full"  # the "exact gradient" batch; LMs use a minibatch (full passes cost minutes per step)
    dense_eval_every: int = 1  # experiment A's evaluation interval (its curves are drawn round by round)
    lora_skews: list[float] = field(default_factory=list)  # B6's LoRA-aggregation sweep: Dirichlet skews 1/α

    @property
    def exact_gradients(self) -> bool:
        """Whether the suite's "full batch" runs really take full-batch gradients."""
        return self.full == "full"


def synthetic_heterogeneity(level: float) -> dict:
    """B5's heterogeneity level on the synthetic model: the scale of the users' reward deviations."""
    return {"heterogeneity": level}


def synthetic_clients(num_clients: int, scale: Scale) -> dict:
    """B5's client-count level on the synthetic model: that many users, each with the same number of pairs."""
    return {
        "num_clients": num_clients,
        "pairs_per_client": scale.clients_sweep_pairs,
        "eval_pairs_per_client": 20,
        "heterogeneity": 1.0,
    }


SYNTHETIC_HETEROGENEITY_ABOUT = (
    "The synthetic users' reward vectors are θ_i = θ★ + s·u_i; sweeping s sweeps ζ², measured at θ★ in each run. "
)


@dataclass
class Dataset:
    name: str
    description: str
    base: Callable[[bool], dict]  # quick → config table with data + policy (+ algorithm.lr)
    scale: Callable[[bool], Scale]
    experiments: tuple[str, ...]
    synthetic_model: bool = False  # data.heterogeneity / data.num_clients / pairs may be overridden
    needs: str = ""  # what a missing workload is called, for the error message
    default_seeds: int = 3
    # B3's noise-driven regime: data with (close to) no heterogeneity, and how the report names it.
    homogeneous_data: dict = field(default_factory=lambda: {"heterogeneity": 0.0})
    homogeneous_text: str = "ζ = 0"
    # B5's sweeps: the data of a heterogeneity level and of a client count, how a level is named and explained.
    heterogeneity_data: Callable[[float], dict] = synthetic_heterogeneity
    heterogeneity_name: str = "ζ-scale"
    heterogeneity_about: str = SYNTHETIC_HETEROGENEITY_ABOUT
    clients_data: Callable[[int, Scale], dict] = synthetic_clients

    @property
    def log_linear(self) -> bool:
        """The policy is log-linear: f★ and exact full-batch gradients, and each run takes milliseconds a round."""
        return self.base(True)["policy"].get("kind", "loglinear") == "loglinear"


def data_root() -> Path:
    """Where the shared preference data lives: $DISTDPO_DATA_DIR, else ../shared/data from here or from the repo."""
    env = os.environ.get("DISTDPO_DATA_DIR")
    if env:
        return Path(env)
    for candidate in (
        Path.cwd() / ".." / "shared" / "data",
        Path(__file__).resolve().parents[3] / ".." / "shared" / "data",  # beside the repository
    ):
        if candidate.is_dir():
            return candidate.resolve()
    return Path("../shared/data")


def synthetic_base(quick: bool) -> dict:
    if quick:
        data = {"num_clients": 8, "pairs_per_client": 60, "eval_pairs_per_client": 30, "dim": 6, "num_actions": 4}
    else:
        data = {"num_clients": 16, "pairs_per_client": 200, "eval_pairs_per_client": 100, "dim": 16, "num_actions": 8}
    data.update(source="synthetic", heterogeneity=2.0)
    return {
        "data": data,
        "policy": {"kind": "loglinear", "beta": 1.0, "loss_type": "sigmoid"},
        "algorithm": {"lr": 0.5},
    }


def synthetic_scale(quick: bool) -> Scale:
    if quick:
        return Scale(
            rounds=200, eval_every=4, batch=8, local_steps=3, local_steps_sweep=[1, 2, 3, 6], long_factor=3,
            participation=[1, 2, 4, 8], staleness=[0, 2, 5],
            topologies=["path", "ring", "star", "torus", "exponential", "complete"],
            gt_rounds=300, eps_rel=1e-4, heterogeneity=[1.0, 2.0, 4.0], num_clients_sweep=[8, 32, 128],
            clients_sweep_pairs=30, clients_sweep_per_round=4,
        )  # fmt: skip
    return Scale(
        rounds=400, eval_every=4, batch=8, local_steps=5, local_steps_sweep=[1, 2, 3, 6, 12], long_factor=3,
        participation=[1, 2, 3, 5, 8, 12, 16], staleness=[0, 1, 2, 3, 5],
        topologies=["path", "ring", "star", "torus", "erdos_renyi", "exponential", "complete"],
        gt_rounds=800, eps_rel=1e-6, heterogeneity=[0.5, 1.0, 2.0, 4.0],
        num_clients_sweep=[10, 100, 1000], clients_sweep_pairs=50, clients_sweep_per_round=10,
    )  # fmt: skip


def language_model_base(path: str, data: dict, lr: float) -> Callable[[bool], dict]:
    def base(quick: bool) -> dict:
        return {
            "data": {
                "source": str(data_root() / path), **data, "max_pairs": 160 if quick else 800,
                "eval_fraction": 0.15, "loss_pairs_per_client": 4 if quick else 8,
            },
            "policy": {
                "kind": "causal_lm", "model": "builtin:gpt2-tiny", "beta": 0.1,
                "max_length": 96 if quick else 192, "lora_r": 8,
            },
            # Plain SGD on the adapter (what the theory analyses), at the dataset's calibrated step size.
            "algorithm": {"lr": lr, "optimizer": "sgd"},
        }  # fmt: skip

    return base


def language_model_scale(quick: bool) -> Scale:
    # Sized so that A–B4 with the default 2 seeds take about 15 minutes on 2 CPU cores (~110 pair gradients/s at
    # 192 tokens; measured: HH 824 s, PandaLM 922 s); B6's 18 LoRA runs add 873 s and 760 s.
    if quick:
        return Scale(
            rounds=6, eval_every=2, batch=4, local_steps=2, local_steps_sweep=[1, 3], long_factor=2,
            participation=[1, 2, 4], staleness=[0, 2], topologies=["path", "ring", "star", "complete"],
            gt_rounds=0, eps_rel=1e-2, full=8, lora_skews=[0.1, 1.0, 10.0],
        )  # fmt: skip
    # No gradient-tracking runs (gt_rounds = 0): their only use is rounds to ε, which needs f★.
    return Scale(
        rounds=16, eval_every=4, batch=4, local_steps=2, local_steps_sweep=[1, 3, 6], long_factor=2,
        participation=[1, 2, 4, 8], staleness=[0, 2, 5],
        topologies=["path", "ring", "star", "complete", "torus", "erdos_renyi", "exponential"],
        gt_rounds=0, eps_rel=1e-2, full=8, dense_eval_every=2, lora_skews=[0.1, 1.0, 10.0],
    )  # fmt: skip


# LM step sizes, calibrated with FedAvg (E = 2, B = 4, 16 rounds): the largest tried whose loss falls without spikes.
# HH: at 0.5 the loss only reaches 0.689, at 2 it reaches 0.684, at 5 it overshoots to 0.72, at 20 it diverges.
# PandaLM (‖∇f‖² ~10× larger at the start): at 0.5 the loss falls smoothly to 0.668, at 1 it spikes to 0.74, at 2
# to 0.91.
HH_LR, PANDALM_LR = 2.0, 0.5

HH_DATA = {
    "format": "hh-rlhf", "partition": "dirichlet", "label_column": "turns", "dirichlet_alpha": 0.5, "num_clients": 8,
}  # fmt: skip
PANDALM_DATA = {
    "format": "pandalm", "pandalm_mode": "votes", "partition": "dirichlet", "label_column": "annotator",
    "dirichlet_alpha": 0.5, "num_clients": 8,
}  # fmt: skip


def language_model_dataset(name: str, description: str, path: str, data: dict, lr: float) -> Dataset:
    """A suite on real preference data with the built-in small causal LM (experiments A–B4 and B6's LoRA
    aggregation, 2 seeds)."""
    return Dataset(
        name, f"{description}, built-in small causal LM", language_model_base(path, data, lr), language_model_scale,
        ("A", "B1", "B2", "B3", "B4", "B6"), default_seeds=2, homogeneous_data={"partition": "iid"},
        homogeneous_text="IID split, ζ ≈ 0",
        needs="the language-model workload (data.source = a preference file, policy.kind = 'causal_lm', policy.model)",
    )  # fmt: skip


# Text features: 32 dimensions keep every client of the suites above 2·d pairs, so that its pairs are not
# separable and its own optimum (the personalization gap's reference) is finite; half of them are hashed
# prompt×response interactions. The step size is about 1/L at the reference (L = β²/4·λ_max(E zzᵀ) is 0.011
# for HH-RLHF and 0.019 for PandaLM); it keeps E = 6 local steps and q_max = 5 stable. The gap's slowest mode
# falls as exp(−2ημt) with μ ≈ 5·10⁻⁴ (PandaLM), so full-batch gradient descent needs about 340 rounds to reach
# 10⁻⁷ of its initial gap (the "no floor" claims' threshold): hence 400 rounds.
FEATURE_DIM, FEATURES_LR = 32, 50.0


def features_base(path: str, data: dict) -> Callable[[bool], dict]:
    def base(quick: bool) -> dict:
        return {
            "data": {
                "source": str(data_root() / path),
                **data,
                "eval_fraction": 0.15,
                "max_pairs": 800 if quick else 0,
            },
            "policy": {"kind": "loglinear", "features": "hashed", "feature_dim": FEATURE_DIM, "beta": 1.0},
            "algorithm": {"lr": FEATURES_LR},
        }

    return base


def features_scale(quick: bool) -> Scale:
    if quick:
        return Scale(
            rounds=150, eval_every=5, batch=8, local_steps=3, local_steps_sweep=[1, 2, 4], long_factor=2,
            participation=[1, 2, 4, 8], staleness=[0, 2, 5], topologies=["path", "ring", "star", "complete"],
            gt_rounds=200, eps_rel=1e-4, heterogeneity=[0.1, 1.0, 4.0], num_clients_sweep=[8, 32],
            clients_sweep_per_round=4, dense_eval_every=5,
        )  # fmt: skip
    return Scale(
        rounds=400, eval_every=5, batch=8, local_steps=3, local_steps_sweep=[1, 2, 3, 6], long_factor=2,
        participation=[1, 2, 4, 8], staleness=[0, 2, 5],
        topologies=["path", "ring", "star", "torus", "exponential", "complete"],
        gt_rounds=300, eps_rel=1e-4, heterogeneity=[0.1, 1.0, 3.0, 10.0], num_clients_sweep=[8, 32, 128],
        clients_sweep_per_round=4, dense_eval_every=5,
    )  # fmt: skip


def dirichlet_skew(label: str) -> Callable[[float], dict]:
    """B5's heterogeneity level on real data: a Dirichlet(1/level) split over ``label`` (level = 1/α)."""
    return lambda level: {"partition": "dirichlet", "label_column": label, "dirichlet_alpha": 1.0 / level}


def iid_clients(num_clients: int, scale: Scale) -> dict:
    """B5's client-count level on real data: the same pairs split IID over that many clients."""
    return {"num_clients": num_clients, "partition": "iid"}


def features_dataset(name: str, description: str, path: str, data: dict, skew_label: str) -> Dataset:
    """A suite on real preference data with the log-linear policy on hashed text features (A–B5 and P, exact)."""
    about = (
        f"Clients are drawn by Dirichlet(α) over the {skew_label!r} label; sweeping the skew 1/α sweeps ζ², "
        "measured at θ★ in each run. On real data ζ² keeps a part no split removes: each client's finite sample "
        "(about σ²/N_i). "
    )
    return Dataset(
        name, f"{description}, log-linear policy on {FEATURE_DIM} hashed text features (f★ known)",
        features_base(path, data), features_scale, ("A", "B1", "B2", "B3", "B4", "B5", "P"),
        homogeneous_data={"partition": "iid"}, homogeneous_text="IID split, ζ ≈ σ²/N_i",
        heterogeneity_data=dirichlet_skew(skew_label), heterogeneity_name="1/α", heterogeneity_about=about,
        clients_data=iid_clients,
    )  # fmt: skip


DATASETS: dict[str, Dataset] = {
    "synthetic": Dataset(
        "synthetic",
        "synthetic personalized Bradley–Terry preferences with known per-user rewards (log-linear policy, f★ known)",
        synthetic_base,
        synthetic_scale,
        ("A", "B1", "B2", "B3", "B4", "B5", "B6"),
        synthetic_model=True,
    ),
    "hh-rlhf": language_model_dataset(
        "hh-rlhf",
        "Anthropic HH-RLHF harmless-base test (2,312 human pairs; Dirichlet(0.5) over dialogue depth into 8 clients)",
        "hh-rlhf/harmless-base-test.jsonl.gz",
        HH_DATA,
        HH_LR,
    ),  # fmt: skip
    "pandalm": language_model_dataset(
        "pandalm",
        "PandaLM test set (human votes of 3 annotators, Dirichlet(0.5) over annotator into 8 clients)",
        "pandalm/testset-v1.json",
        PANDALM_DATA,
        PANDALM_LR,
    ),  # fmt: skip
    "hh-rlhf-features": features_dataset(
        "hh-rlhf-features",
        "Anthropic HH-RLHF harmless-base test (2,312 human pairs; Dirichlet(0.5) over dialogue depth into 8 clients)",
        "hh-rlhf/harmless-base-test.jsonl.gz",
        HH_DATA,
        "turns",
    ),  # fmt: skip
    "pandalm-features": features_dataset(
        "pandalm-features",
        "PandaLM test set (human votes of 3 annotators, Dirichlet(0.5) over annotator into 8 clients; B5 skews the "
        "50 application categories, over which the annotators' votes differ more than between annotators)",
        "pandalm/testset-v1.json",
        PANDALM_DATA,
        "application",
    ),  # fmt: skip
}


def without_progress(table: dict) -> dict:
    """A copy of ``table`` with the engine's progress bar off."""
    copied = copy.deepcopy(table)
    copied.setdefault("engine", {})["progress"] = False
    return copied


def dataset_base(name: str, quick: bool) -> dict:
    """The dataset's base table, validated; a dataset this install cannot run raises :class:`DatasetUnavailable`."""
    if name not in DATASETS:
        raise ConfigError(f"--dataset must be one of {', '.join(DATASETS)}, got {name!r}")
    dataset = DATASETS[name]
    table = dataset.base(quick)
    source = table["data"].get("source", "synthetic")
    if source != "synthetic" and not Path(source).exists():
        raise DatasetUnavailable(
            f"dataset {name!r}: data file {source} not found "
            f"(set DISTDPO_DATA_DIR to the folder holding {Path(source).parent.name}/)"
        )
    try:
        from_dict(without_progress(table))
    except ConfigError as e:
        if dataset.needs:
            raise DatasetUnavailable(
                f"dataset {name!r} needs {dataset.needs}, which this install does not accept yet: {e}. "
                f"Its base config is data.source = {source!r}, policy.kind = {table['policy'].get('kind')!r}, "
                f"policy.model = {table['policy'].get('model')!r}; use --dataset synthetic meanwhile"
            ) from None
        raise
    return table
