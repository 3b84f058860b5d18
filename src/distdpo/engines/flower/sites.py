"""Per-site data in Flower (``data.source = "local"``): each SuperNode reads only its own site's files, the server none.

A SuperNode's site is named by its node config (``data-path``, optional ``eval-path`` and ``client-name``) or,
in Flower's simulation, by ``data.site_data`` at its ``partition-id``. Asked at the start, a site tells its
name and its numbers of training and held-out pairs; the server builds the model alone (``policy.model``: a
directory every site has, e.g. from ``distdpo init-model``) and measures the global model with Flower
``evaluate`` messages: each site returns the :class:`~distdpo.tasks.evaluation.ClientReport` of its client and
the server combines them with the simulator's formulas (:func:`~distdpo.tasks.evaluation.combine`).
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from distdpo import build
from distdpo.config import Config, ConfigError
from distdpo.engines.flower import common as wire
from distdpo.fingerprint import digest
from distdpo.tasks.evaluation import HELD_OUT_SUMS, ClientReport, combine, gradient, mean_grad_noise

SIZES, NAMES = "client-sizes", "client-names"  # every site's training-pair count and name, sent by the server
MEASURE = "measure"  # what an evaluate message asks for: "reports" or "grad-noise"
TRAIN_PAIRS, EVAL_PAIRS, DATA = "train-pairs", "eval-pairs", "data-digest"


def _empty(n: int) -> list[np.ndarray]:
    return [np.zeros(0, dtype=np.int64) for _ in range(n)]


# ---- a SuperNode's site -------------------------------------------------------------------------

_SITES: dict[tuple, object] = {}  # (config, partition) → SiteData, or → task with the clients' counts


def _cached(key: tuple, make):
    if key not in _SITES:
        if any(k[0] != key[0] for k in _SITES):  # one run at a time per process: keep memory flat
            _SITES.clear()
        _SITES[key] = make()
    return _SITES[key]


def site_data(text: str, cfg: Config, node_config, pid: int):
    """This SuperNode's site, read once per process: its node config's files, else ``data.site_data``'s."""
    from distdpo.data.sites import NODE_DATA, load_site, node_site, site_files

    def load():
        if NODE_DATA in node_config:
            site = node_site(node_config)
        elif cfg.data.site_data:
            files = site_files(cfg)
            if not 0 <= pid < len(files):
                raise ConfigError(f"partition-id {pid}: data.site_data = {cfg.data.site_data!r} has {len(files)} sites")
            site = files[pid]
        else:
            site = node_site(node_config)  # (raises: no data-path)
        return load_site(cfg, site)

    return _cached((text, pid, "data"), load)


def site_info(text: str, cfg: Config, node_config, pid: int) -> tuple[MetricRecord, ConfigRecord]:
    """What a site tells the server at the start: its pair counts and a digest of its data; its name."""
    site = site_data(text, cfg, node_config, pid)
    texts = "\n".join(f"{p}\0{c}\0{r}" for p, c, r in zip(site.data.prompt, site.data.chosen, site.data.rejected))
    data = digest([torch.as_tensor(site.train), torch.as_tensor(site.eval)], texts)
    metrics = MetricRecord({TRAIN_PAIRS: len(site.train), EVAL_PAIRS: len(site.eval)})
    return metrics, ConfigRecord({"name": site.name, DATA: data, "files": list(site.files)})


def site_task(text: str, cfg: Config, node_config, pid: int, sizes: list[int], names: list[str]):
    """The task of this site alone (the others' pair lists empty), with every client's count for the batches."""
    from distdpo.data.split import TextSplit

    def make():
        site = site_data(text, cfg, node_config, pid)
        train, held_out = _empty(len(names)), _empty(len(names))
        train[pid], held_out[pid] = site.train, site.eval
        return build.build_text_task(cfg, TextSplit(site.data, train, held_out, names, site.stats, site.files), sizes)

    return _cached((text, pid, tuple(sizes), tuple(names)), make)


def measure(task, theta: torch.Tensor, what: str) -> RecordDict:
    """This site's answer to an evaluate message: its client's report, or its gradient noise."""
    if what == "grad-noise":
        noise = [v for v in task.client_grad_noise(theta).values() if v is not None]  # (a MetricRecord holds no None)
        return RecordDict({"metrics": MetricRecord({"grad-noise": noise})})
    (r,) = task.client_reports(theta)
    scalars = {"client": r.client, "loss": r.loss, "held-out": r.held_out, "correct": r.correct}
    scalars |= {"tokens": r.tokens, "seconds": r.seconds} | {f"sum:{k}": v for k, v in r.sums.items()}
    return RecordDict({"arrays": wire.to_record(grad=r.grad), "metrics": MetricRecord(scalars)})


def _report(content: RecordDict) -> ClientReport:
    m = content["metrics"]
    return ClientReport(
        int(m["client"]),
        float(m["loss"]),
        wire.from_record(content["arrays"], "grad", torch.float64),
        held_out=int(m["held-out"]),
        correct=float(m["correct"]),
        sums={k: float(m[f"sum:{k}"]) for k in HELD_OUT_SUMS if f"sum:{k}" in m},
        tokens=int(m["tokens"]),
        seconds=float(m["seconds"]),
    )


# ---- the server's view ----------------------------------------------------------------------------


class RemoteSites:
    """The server's task under per-site data: the model (no pairs), every site's counts from its answer, and the
    measurements of :class:`~distdpo.tasks.text.TextTask` computed at the sites."""

    def __init__(self, cfg: Config, grid, nodes):
        from distdpo.data.split import TextSplit
        from distdpo.data.text import TextPreferenceData

        self.cfg, self.grid, self.nodes = cfg, grid, nodes
        n = nodes.n
        info = [nodes.info[i] for i in range(n)]
        names = [str(c["config"]["name"]) for c in info]
        self.sizes = [int(c["metrics"][TRAIN_PAIRS]) for c in info]
        self._held_out = [int(c["metrics"][EVAL_PAIRS]) for c in info]
        # One placeholder pair (the tokenizer takes no empty batch); no client's index reaches it.
        split = TextSplit(TextPreferenceData(["-"], ["-"], ["-"]), _empty(n), _empty(n), names, {})
        self.task = build.build_text_task(cfg, split, self.sizes)  # the model every site starts from
        nodes.names = names
        model = self.task.fingerprint()["model"]
        self._fingerprint = {"data": digest([], *(str(c["config"][DATA]) for c in info)), "model": model}
        self.data_stats = {"sites": n, "train_pairs": sum(self.sizes), "eval_pairs": sum(self._held_out)}
        self.files_by_site = {name: list(c["config"]["files"]) for name, c in zip(names, info)}

    def __getattr__(self, name: str):
        return getattr(self.task, name)

    def fingerprint(self) -> dict[str, str]:
        return dict(self._fingerprint)

    def held_out_sizes(self) -> list[int]:
        return list(self._held_out)

    def config(self) -> ConfigRecord:
        """What every message to a site carries: the run's config and every client's count and name."""
        return ConfigRecord({wire.CONFIG: self.nodes.text, SIZES: self.sizes, NAMES: self.client_names})

    def _ask(self, theta: torch.Tensor, what: str) -> list[RecordDict]:
        """Every site's answer to an evaluate message (evaluation needs them all)."""
        self.nodes.refresh()
        config = self.config()
        config[MEASURE] = what
        content = RecordDict({"arrays": wire.to_record(theta=theta), "config": config})
        pids = sorted(self.nodes.node_of)
        sent = [Message(content, self.nodes.node_of[p], "evaluate") for p in pids]
        replies = list(self.grid.send_and_receive(sent, timeout=self.cfg.engine.flower_timeout))
        n = self.task.num_clients
        good = self.nodes.check(replies, sent, list(range(n)), n, f"evaluation ({what})")
        return [m.content for m in good]

    def evaluate(self, theta: torch.Tensor, weights: torch.Tensor) -> dict[str, float]:
        return combine([_report(c) for c in self._ask(theta, "reports")], weights, self.client_names)

    def full_gradient(self, theta: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return gradient([_report(c) for c in self._ask(theta, "reports")], weights)

    def grad_noise(self, theta: torch.Tensor) -> float:
        return mean_grad_noise(float(v) for c in self._ask(theta, "grad-noise") for v in c["metrics"]["grad-noise"])


__all__ = ["RemoteSites", "measure", "site_info", "site_task"]
