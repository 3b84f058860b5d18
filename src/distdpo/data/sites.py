"""Per-site preference files (``data.source = "local"``): each site reads its own files and nothing else.

A site's files are named by the config, never by the data of another site:
``data.site_data`` is either a ``distdpo split`` directory (``DIR/<client>/train.jsonl`` and, when present,
``DIR/<client>/eval.jsonl``; the site names are those of ``DIR/manifest.json``) or a path template with
``{client}`` filled by each name of ``data.clients``. ``data.site_eval`` (a template) names held-out files; a site
without one holds out whole prompts of its own pairs (``data.eval_fraction``), as the pooled split does across
sites. A Flower SuperNode gets its paths from its node config instead (``data-path``, ``eval-path``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distdpo.config import Config, ConfigError
from distdpo.data.partition import drop_duplicates, prompt_key, train_eval_split
from distdpo.data.split import TextSplit
from distdpo.data.text import DataFormatError, TextPreferenceData, load_preferences

CLIENT = "{client}"


@dataclass(frozen=True)
class SiteFiles:
    """One site: its name, its training file and its held-out file (``None``: held out from its own pairs)."""

    name: str
    train: Path
    eval: Path | None = None


@dataclass
class SiteData:
    """What one site read: its pairs (training first, then held-out), which is which, and its counts."""

    name: str
    data: TextPreferenceData
    train: np.ndarray
    eval: np.ndarray
    stats: dict[str, int]
    files: tuple[str, ...]  # the paths this site opened


def _manifest_names(root: Path) -> list[tuple[str, str]]:
    """(client name, its folder) from a ``distdpo split`` directory's manifest."""
    try:
        manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
        return [(c["name"], c["dir"]) for c in manifest["clients"]]
    except FileNotFoundError:
        raise ConfigError(
            f"data.site_data = {str(root)!r} is a directory without manifest.json: give a `distdpo split` directory "
            "or a path template with {client} (and data.clients)"
        ) from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"{root / 'manifest.json'} is not a `distdpo split` manifest ({e})") from None


def site_files(cfg: Config) -> list[SiteFiles]:
    """Every site of a ``data.source = "local"`` config, in client order (the names of the run's clients)."""
    d = cfg.data
    if not d.site_data:
        raise ConfigError(
            'data.source = "local" needs data.site_data: a `distdpo split` directory or a path template with '
            "{client} (a Flower SuperNode names its files with --node-config data-path=... instead)"
        )
    eval_template = d.site_eval or None
    if eval_template and CLIENT not in eval_template:
        raise ConfigError(f"data.site_eval = {eval_template!r} must contain {CLIENT} (one file per site)")
    if CLIENT not in d.site_data:
        root = Path(d.site_data).expanduser()
        if not root.is_dir():
            raise ConfigError(f"data.site_data = {d.site_data!r} is neither a directory nor a template with {CLIENT}")
        sites = []
        for name, folder in _manifest_names(root):
            if eval_template:  # named by the user: a missing one is an error when it is read, not a fallback
                held_out = Path(eval_template.replace(CLIENT, name)).expanduser()
            else:  # the split's own, where it made one
                held_out = root / folder / "eval.jsonl"
                held_out = held_out if held_out.exists() else None
            sites.append(SiteFiles(name, root / folder / "train.jsonl", held_out))
        return sites
    if not d.clients:
        raise ConfigError(f"data.site_data = {d.site_data!r} is a template: list the sites in data.clients")
    return [
        SiteFiles(
            str(name),
            Path(d.site_data.replace(CLIENT, str(name))).expanduser(),
            Path(eval_template.replace(CLIENT, str(name))).expanduser() if eval_template else None,
        )
        for name in d.clients
    ]


def _read(cfg: Config, path: Path, what: str) -> TextPreferenceData:
    d = cfg.data
    try:
        return load_preferences(path, d.format, on_error=d.on_error, pandalm_mode=d.pandalm_mode)
    except FileNotFoundError:
        raise ConfigError(f"{what}: {path} does not exist") from None
    except DataFormatError as e:
        raise ConfigError(f"{what}: {e}") from None


def load_site(cfg: Config, site: SiteFiles) -> SiteData:
    """Read one site's files (only these) and split off its held-out pairs when it has no held-out file."""
    train = _read(cfg, site.train, f"site {site.name!r} training file")
    keys = [
        (prompt_key(p), prompt_key(c), prompt_key(r)) for p, c, r in zip(train.prompt, train.chosen, train.rejected)
    ]
    (kept,), dropped = drop_duplicates([np.arange(len(train))], keys)
    files = (str(site.train),)
    if site.eval is None:
        try:
            (train_ids,), (eval_ids,) = train_eval_split(
                [kept], cfg.data.eval_fraction, seed=cfg.seed, groups=[k[0] for k in keys]
            )
        except ValueError as e:
            raise ConfigError(f"site {site.name!r}: {e}") from None
        data = train
    else:
        held = _read(cfg, site.eval, f"site {site.name!r} held-out file")
        files += (str(site.eval),)
        train_ids, eval_ids = np.sort(kept), len(train) + np.arange(len(held))
        data = train.concat(held)
        trained_prompts = {keys[i][0] for i in train_ids.tolist()}
        leaked = sum(prompt_key(p) in trained_prompts for p in held.prompt)
        if leaked:
            raise ConfigError(
                f"site {site.name!r}: {leaked} held-out pair(s) in {site.eval} share a prompt with {site.train}; "
                "held-out pairs must have prompts the site does not train on (`distdpo split` writes such files)"
            )
    if len(train_ids) == 0:
        raise ConfigError(f"site {site.name!r} has no training pairs in {site.train}")
    stats = {
        **train.stats,
        "duplicates_dropped_within_client": dropped,
        "train_pairs": len(train_ids),
        "eval_pairs": len(eval_ids),
    }
    return SiteData(site.name, data, np.asarray(train_ids), np.asarray(eval_ids), stats, files)


# A Flower SuperNode's node config names its site: --node-config "data-path=... eval-path=... client-name=...".
NODE_DATA, NODE_EVAL, NODE_NAME = "data-path", "eval-path", "client-name"


def node_site(node_config) -> SiteFiles:
    """The site a Flower SuperNode serves, from its node config (the server never names a site's files)."""
    if NODE_DATA not in node_config:
        raise ConfigError(
            f'data.source = "local": this SuperNode has no {NODE_DATA!r} in its node config; start it with '
            f'--node-config "{NODE_DATA}=/site/prefs.jsonl {NODE_EVAL}=/site/heldout.jsonl {NODE_NAME}=<name>"'
        )
    train = Path(str(node_config[NODE_DATA])).expanduser()
    held_out = node_config.get(NODE_EVAL)
    default = train.parent.name if train.stem == "train" else train.stem  # <client>/train.jsonl or <client>.jsonl
    name = str(node_config.get(NODE_NAME) or default)
    return SiteFiles(name, train, Path(str(held_out)).expanduser() if held_out else None)


def sites_split(cfg: Config, sites: list[SiteFiles], held: list[int] | None = None) -> TextSplit:
    """``sites`` as a split over clients, reading only the files of the sites in ``held`` (all by default); the
    other sites' train and held-out index arrays are empty."""
    held = list(range(len(sites))) if held is None else held
    empty = np.zeros(0, dtype=np.int64)
    train, held_out = [empty] * len(sites), [empty] * len(sites)
    data, offset = None, 0
    stats: dict[str, int] = {}
    files: list[str] = []
    for i in held:
        site = load_site(cfg, sites[i])
        data = site.data if data is None else data.concat(site.data)
        train[i], held_out[i] = site.train + offset, site.eval + offset
        offset += len(site.data)
        files += site.files
        for key, value in site.stats.items():
            stats[key] = stats.get(key, 0) + int(value)
    return TextSplit(data, train, held_out, [site.name for site in sites], stats, files)


def local_split(cfg: Config, held: list[int] | None = None) -> TextSplit:
    """The sites a ``data.source = "local"`` config names, reading only those in ``held`` (all by default)."""
    return sites_split(cfg, site_files(cfg), held)


__all__ = ["SiteData", "SiteFiles", "load_site", "local_split", "node_site", "site_files", "sites_split"]
