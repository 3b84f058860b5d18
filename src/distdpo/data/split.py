"""A config's text data split over clients, held out by prompt; and ``distdpo split``, which writes it per client.

The split is the one every engine trains on: load the pairs, take the seeded
``data.max_pairs`` subset, partition them over clients, drop exact duplicates
inside a client, then hold out whole prompts across all clients (no held-out
prompt is trained on by any client).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from distdpo.config import Config, ConfigError
from distdpo.data.partition import drop_duplicates, partition, prompt_key, train_eval_split
from distdpo.data.text import DataFormatError, TextPreferenceData, load_preferences
from distdpo.io import directory_atomic


@dataclass
class TextSplit:
    """The loaded pairs, each client's train and held-out indices into them, client names and counts."""

    data: TextPreferenceData
    train: list[np.ndarray]
    eval: list[np.ndarray]
    names: list[str]
    stats: dict[str, int]
    files: list[str] = field(default_factory=list)  # the data files this process opened (per-site data)


def split_text_data(cfg: Config) -> TextSplit:
    """Load ``cfg.data.source`` and split it over clients as every engine does."""
    d = cfg.data
    try:
        data = load_preferences(
            d.source, d.format, on_error=d.on_error, split=d.split or None, pandalm_mode=d.pandalm_mode
        )
    except (DataFormatError, FileNotFoundError) as e:
        raise ConfigError(f"data.source: {e}") from None
    if d.max_pairs and d.max_pairs < len(data):
        keep = np.sort(np.random.default_rng(cfg.seed).choice(len(data), d.max_pairs, replace=False))
        data = data.select(keep)
    labels = None
    if d.label_column:
        try:
            labels = data.column(d.label_column)
        except KeyError as e:
            raise ConfigError(f"data.label_column: {e.args[0]}") from None
    prompts = [prompt_key(p) for p in data.prompt]
    triples = [(p, prompt_key(c), prompt_key(r)) for p, c, r in zip(prompts, data.chosen, data.rejected)]
    try:
        clients, names = partition(
            len(data),
            None if d.partition == "natural" else d.num_clients,
            d.partition,
            labels=labels,
            alpha=d.dirichlet_alpha,
            quantity_alpha=d.quantity_alpha,
            seed=cfg.seed,
            min_size=2,
        )
        clients, dropped = drop_duplicates(clients, triples)
        train, held_out = train_eval_split(clients, d.eval_fraction, seed=cfg.seed, groups=prompts)
    except ValueError as e:
        raise ConfigError(f"data.partition: {e}") from None
    prompt_counts, triple_counts = Counter(prompts), Counter(triples)
    stats = {
        **data.stats,
        "pairs_sharing_prompt": sum(n for n in prompt_counts.values() if n > 1),
        "exact_duplicates": sum(n - 1 for n in triple_counts.values()),
        "duplicates_dropped_within_client": dropped,
        "train_pairs": int(sum(len(t) for t in train)),
        "eval_pairs": int(sum(len(e) for e in held_out)),
    }
    return TextSplit(data, train, held_out, names, stats)


def client_dir_name(name: str, taken: set[str]) -> str:
    """A file-system-safe, unique directory name for a client."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "client"
    out, k = base[:100], 1
    while out in taken:
        k += 1
        out = f"{base[:100]}-{k}"
    taken.add(out)
    return out


def _jsonl(data: TextPreferenceData, indices: np.ndarray) -> str:
    columns = [c for c in data.columns]
    lines = []
    for i in indices.tolist():
        record = {"prompt": data.prompt[i], "chosen": data.chosen[i], "rejected": data.rejected[i]}
        record.update({c: data.columns[c][i] for c in columns})
        lines.append(json.dumps(record, ensure_ascii=False))
    return "".join(line + "\n" for line in lines)


def write_split(split: TextSplit, cfg: Config, out: str | Path) -> Path:
    """Write ``out/<client>/train.jsonl``, ``out/<client>/eval.jsonl`` and ``out/manifest.json``.

    Refuses an ``out`` that exists and is not empty; writes into a temporary directory beside it and renames.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} already exists and is not an empty directory; choose a new directory")
    try:
        with directory_atomic(out) as tmp:
            taken: set[str] = set()
            clients = []
            for name, train, held in zip(split.names, split.train, split.eval):
                folder = client_dir_name(name, taken)
                (tmp / folder).mkdir()
                (tmp / folder / "train.jsonl").write_text(_jsonl(split.data, train), encoding="utf-8")
                (tmp / folder / "eval.jsonl").write_text(_jsonl(split.data, held), encoding="utf-8")
                clients.append({"name": name, "dir": folder, "train_pairs": len(train), "eval_pairs": len(held)})
            manifest = {"format": "trl", "clients": clients, "config": cfg.to_dict(), "data_stats": split.stats}
            text = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
            (tmp / "manifest.json").write_text(text, encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot write --out {out}: {e.strerror}") from None
    return out


__all__ = ["TextSplit", "client_dir_name", "split_text_data", "write_split"]
