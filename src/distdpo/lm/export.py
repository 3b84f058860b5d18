"""The model a causal-LM run produced, written where the ecosystem loads it: ``models/<run label>/``.

Federated and centralized runs export the global model, decentralized runs the
nodes' average θ̄ (and, with ``engine.save_node_models``, each node's own model
under ``nodes/<client>/``). A LoRA run is a PEFT adapter directory
(``adapter_config.json``, ``adapter_model.safetensors``) with the tokenizer; full
fine-tuning a ``save_pretrained`` model directory. A base model that exists
nowhere else (a built-in model, or one merged from another export) is written to
``base/``. ``distdpo.json`` says where the model came from: config, run label,
round, data fingerprint, metrics, and where its base is (see
:mod:`distdpo.lm.pretrained`, which loads it back). The directory is written
beside its place and renamed into it.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path

import torch

from distdpo import __version__
from distdpo.config import DECENTRALIZED, Config, ConfigError
from distdpo.data.split import client_dir_name
from distdpo.hub import is_local
from distdpo.io import directory_atomic, file_name, write_json_atomic
from distdpo.lm.pretrained import EXPORT_INFO, is_adapter_dir, quiet_transformers

BASE_DIR = "base"
NODES_DIR = "nodes"

# Where the runs being trained now export their models (the run directory's models/); None: nowhere. A plain
# module global, not a context variable: Flower's simulation trains in a thread of its own.
_models_dir: Path | None = None


@contextlib.contextmanager
def exporting_to(models_dir: str | Path) -> Iterator[None]:
    """Causal-LM runs trained inside this block export their models under ``models_dir``."""
    global _models_dir
    previous, _models_dir = _models_dir, Path(models_dir)
    try:
        yield
    finally:
        _models_dir = previous


def export_run(cfg: Config, label: str, algo, rec, fingerprint: dict | None, round_index: int, theta=None):
    """Export the model of ``algo`` after ``round_index``; returns the directory, or None where nothing is written.

    Called on every process of a run (gathering the node models is a collective under torch.distributed); the
    process holding the recorder ``rec`` writes.
    """
    if _models_dir is None or cfg.policy.kind != "causal_lm":
        return None
    theta = algo.global_params() if theta is None else theta
    nodes = algo.node_params() if cfg.engine.save_node_models and hasattr(algo, "node_params") else None
    if rec is None:
        return None
    target = _models_dir / file_name(label)
    if target.exists() and not (target / EXPORT_INFO).is_file():
        raise ConfigError(f"{target} holds files distdpo did not write; it is not overwritten with the run's model")
    task, policy = rec.task, rec.task.policy
    decentralized = cfg.algorithm.name in DECENTRALIZED
    info = {
        "written_by": f"distdpo {__version__}",
        "run": label,
        "round": round_index,
        "final": round_index == cfg.algorithm.rounds,
        "model": "average" if decentralized else "global",
        "format": "peft_adapter" if policy.lora else "model",
        "reference_model": cfg.policy.reference_model or None,
        "fingerprint": fingerprint,
        "metrics": {k: v for k, v in rec.rows[-1].items() if k not in ("run", "algorithm")},
        "config": cfg.to_dict(),
    }
    with directory_atomic(target) as folder, quiet_transformers():
        base = _write_base(cfg.policy.model, task, folder / BASE_DIR)
        _write_model(policy, theta, folder, {**info, **base})
        taken: set[str] = set()
        for name, row in zip(task.client_names, [] if nodes is None else nodes):
            node_base = {"base_dir": f"../../{BASE_DIR}"} if "base_dir" in base else base
            node_info = {**info, "model": "node", "node": name, **node_base}
            _write_model(policy, row, folder / NODES_DIR / client_dir_name(name, taken), node_info)
    return target


def _write_base(model: str, task, folder: Path) -> dict:
    """Write the starting model to ``folder`` unless it can be loaded from where it came from; say where it is."""
    from distdpo.lm.builtin import is_builtin

    if not (is_builtin(model) or (is_local(model) and is_adapter_dir(model))):
        return {"base_model": str(Path(model).expanduser().resolve()) if is_local(model) else model}
    policy = task.policy
    if policy.lora:
        base = copy.deepcopy(policy.model).unload()  # the model without its adapter layers
    else:
        policy.set_flat(task.initial_params())
        base = policy.model
    base.save_pretrained(folder)
    policy.tokenizer.save_pretrained(folder)
    return {"base_dir": BASE_DIR}


def _write_model(policy, params: torch.Tensor, folder: Path, info: dict) -> None:
    """The policy with trainable parameters ``params``: its adapter (LoRA) or the whole model, the tokenizer."""
    policy.set_flat(params)
    if policy.lora:
        policy.model.save_pretrained(folder, save_embedding_layers=False)  # the vocabulary is never resized
    else:
        policy.model.save_pretrained(folder)
    policy.tokenizer.save_pretrained(folder)
    write_json_atomic(folder / EXPORT_INFO, info)


__all__ = ["exporting_to", "export_run"]
