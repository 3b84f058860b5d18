"""Federated aggregation of LoRA adapters, and how far it is from averaging the clients' updates W_i = B_i A_i.

* ``factors`` (FedIT): average A and B separately; B̄Ā ≠ Σ p_i B_i A_i in general.
* ``freeze_a`` (FFA-LoRA): A stays at its seeded initialisation on every site and only B is trained and sent, so
  Σ p_i B_i A = B̄ A exactly (the policy leaves A out of the trainable vector).
* ``product``: form Σ p_i B_i A_i exactly and re-factor it to rank r by a truncated SVD; every client gets the same
  new factors. The error is then the truncation's residual.

Heterogeneous ranks (``policy.lora_r`` a list or ``"by_size:MIN-MAX"``): one adapter of the largest rank r holds
every client's; client i uses only its first r_i components (rows of A, columns of B) and starts each round from the
global adapter cut to them (:func:`rank_masks`). After ``product`` the global factors are in SVD order, so the cut is
the best rank-r_i approximation of Σ p_j B_j A_j (FlexLoRA); after ``factors`` it is HetLoRA's truncation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distdpo.config import ALGORITHM_SPECS, Config, ConfigError, max_lora_rank, resolve_server_optimizer


@dataclass(frozen=True)
class LoraFactors:
    """One adapted module: where its A ([r, in]) and B ([out, r]) lie in the flat trainable vector.

    ``a`` is the fixed A itself when A is not trained (``freeze_a``)."""

    a: slice | torch.Tensor
    a_shape: tuple[int, ...]
    b: slice
    b_shape: tuple[int, ...]


def lora_layout(model) -> list[LoraFactors]:
    """The LoRA factors of a `peft` model, in the order of its trainable parameters (the flat vector's order)."""
    named = dict(model.named_parameters())
    where, at = {}, 0
    for name, p in named.items():
        if p.requires_grad:
            where[name] = slice(at, at + p.numel())
            at += p.numel()
    layout = []
    for name, p in named.items():
        if ".lora_A." in name:
            b_name = name.replace(".lora_A.", ".lora_B.")
            a = where.get(name, p.detach().clone())
            layout.append(LoraFactors(a, tuple(p.shape), where[b_name], tuple(named[b_name].shape)))
    return layout


def _factors(values: torch.Tensor, f: LoraFactors) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row's (A_i [S, r, in], B_i [S, out, r]) in float64."""
    S = values.shape[0]
    if isinstance(f.a, slice):
        A = values[:, f.a].reshape(S, *f.a_shape)
    else:
        A = f.a.to(values.device).expand(S, *f.a_shape)
    return A.double(), values[:, f.b].reshape(S, *f.b_shape).double()


def _core(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """left @ right = Q_l M Q_rᵀ with orthonormal Q's and a small M: ‖left @ right‖_F = ‖M‖_F, and an SVD of M is one
    of the product, without forming the [out, in] matrix."""
    q_l, r_l = torch.linalg.qr(left)
    q_r, r_r = torch.linalg.qr(right.T)
    return q_l, r_l @ r_r.T, q_r


def aggregate_lora(
    values: torch.Tensor, weights: torch.Tensor, layout: list[LoraFactors], mode: str
) -> tuple[torch.Tensor, float]:
    """Aggregate the clients' flat vectors ``values`` [S, p] with weights p_i (summing to 1).

    Returns the aggregated vector and ‖Σ p_i B_i A_i − B A‖_F / ‖Σ p_i B_i A_i‖_F over all modules together (B A: what
    the aggregate holds)."""
    w = weights.to(values.device, torch.float64)
    merged = w.to(values.dtype) @ values
    off, total = 0.0, 0.0
    for f in layout:
        A, B = _factors(values, f)
        r = f.a_shape[0]
        wB = (w[:, None, None] * B).permute(1, 0, 2).reshape(B.shape[1], -1)  # [out, S·r]
        As = A.reshape(-1, A.shape[2])  # [S·r, in]
        q_l, M, q_r = _core(wB, As)
        total += float((M**2).sum())
        if mode == "product":
            U, s, Vh = torch.linalg.svd(M, full_matrices=False)
            root = s[:r].sqrt()
            new_b = q_l @ (U[:, :r] * root)
            new_a = (root[:, None] * Vh[:r]) @ q_r.T
            off += float((s[r:] ** 2).sum())
            if isinstance(f.a, slice):
                merged[f.a] = new_a.reshape(-1).to(merged.dtype)
            merged[f.b] = new_b.reshape(-1).to(merged.dtype)
        else:
            A_bar, B_bar = (w[:, None, None] * A).sum(0), (w[:, None, None] * B).sum(0)
            M_diff = _core(torch.cat([wB, -B_bar], 1), torch.cat([As, A_bar]))[1]
            off += float((M_diff**2).sum())
    return merged, (off / total) ** 0.5 if total > 0 else 0.0


def client_ranks(lora_r: int | list[int] | str, sizes: list[int]) -> list[int] | None:
    """Each client's LoRA rank from ``policy.lora_r`` (None: one rank for all). ``"by_size:MIN-MAX"``: r_i =
    MAX · n_i / max_j n_j, rounded and kept within [MIN, MAX]."""
    if isinstance(lora_r, int):
        return None
    if isinstance(lora_r, list):
        if len(lora_r) != len(sizes):
            raise ConfigError(f"policy.lora_r lists {len(lora_r)} ranks, but the data has {len(sizes)} clients")
        ranks = list(lora_r)
    else:
        low, high = (int(v) for v in lora_r.removeprefix("by_size:").split("-"))
        ranks = [min(high, max(low, round(high * n / max(sizes)))) for n in sizes]
    return None if len(set(ranks)) == 1 and ranks[0] == max_lora_rank(lora_r) else ranks


@dataclass(frozen=True)
class RankMasks:
    """Which entries of the flat vector client i's rank-r_i adapter holds (A's first r_i rows, B's first r_i columns,
    every other trainable entry): one 0/1 row per distinct rank, so memory does not grow with the clients."""

    rows: torch.Tensor  # [distinct ranks, num_params]
    of_client: torch.Tensor  # [clients]: the row of each client's rank

    def __getitem__(self, clients) -> torch.Tensor:
        return self.rows[self.of_client[clients]]

    def held(self, clients: torch.Tensor) -> list[int]:
        """How many entries each of ``clients`` holds (what it receives and sends)."""
        return self.rows.sum(1)[self.of_client[clients]].long().tolist()

    def to(self, like: torch.Tensor) -> RankMasks:
        return RankMasks(self.rows.to(like), self.of_client.to(like.device))


def rank_masks(layout: list[LoraFactors], num_params: int, ranks: list[int]) -> RankMasks:
    """The :class:`RankMasks` of clients with LoRA ranks ``ranks`` in one adapter laid out as ``layout``."""
    distinct = sorted(set(ranks))
    rows = torch.ones(len(distinct), num_params)
    for row, rank in zip(rows, distinct):
        for f in layout:
            row[f.a].view(f.a_shape)[rank:] = 0
            row[f.b].view(f.b_shape)[:, rank:] = 0
    return RankMasks(rows, torch.tensor([distinct.index(r) for r in ranks]))


def check_lora_aggregation(cfg: Config) -> None:
    """``algorithm.lora_aggregation`` other than ``factors`` needs a LoRA causal LM (and product a federated run);
    per-client ranks need a server that aggregates (and a trained A)."""
    mode = cfg.algorithm.lora_aggregation
    if not isinstance(cfg.policy.lora_r, int):
        _check_ranks(cfg)
    if mode == "factors":
        return
    key = f"algorithm.lora_aggregation = {mode!r}"
    if cfg.policy.kind != "causal_lm" or max_lora_rank(cfg.policy.lora_r) == 0:
        raise ConfigError(f"{key} needs a LoRA policy (policy.kind = 'causal_lm' and policy.lora_r > 0)")
    if mode == "product" and ALGORITHM_SPECS[cfg.algorithm.name].family != "federated":
        raise ConfigError(f"{key} aggregates at a server: it needs a federated algorithm, not {cfg.algorithm.name!r}")
    if mode == "product" and cfg.engine.name == "flower":
        _check_flower_product(cfg, key)


def _check_flower_product(cfg: Config, key: str) -> None:
    """Flower's server re-factors the replies itself: it must see each one, and no strategy step may follow."""
    a, e = cfg.algorithm, cfg.engine
    if e.secure_aggregation or e.dp_clip > 0:
        raise ConfigError(
            f"{key} needs every client's factors at the server; engine.secure_aggregation and engine.dp_clip hide or "
            "change them (use 'freeze_a', exact under any sum)"
        )
    if ALGORITHM_SPECS[a.name].scaffold or resolve_server_optimizer(a) != "sgd" or a.server_lr != 1.0:
        raise ConfigError(
            f"{key} on engine 'flower' replaces the strategy's average: it runs with fedavg or fedprox and the plain "
            f"server step (server_optimizer 'sgd', server_lr = 1), got algorithm.name = {a.name!r}"
        )


def _check_ranks(cfg: Config) -> None:
    key = f"policy.lora_r = {cfg.policy.lora_r!r} (a rank per client)"
    if cfg.policy.kind != "causal_lm":
        raise ConfigError(f"{key} needs a LoRA policy (policy.kind = 'causal_lm')")
    if ALGORITHM_SPECS[cfg.algorithm.name].family != "federated":
        raise ConfigError(
            f"{key}: clients of different ranks meet at a server that aggregates their products; it needs a federated "
            f"algorithm, not {cfg.algorithm.name!r}"
        )
    if cfg.algorithm.lora_aggregation == "freeze_a":
        raise ConfigError(f"{key}: use lora_aggregation = 'product' (FlexLoRA) or 'factors' (HetLoRA), not 'freeze_a'")
    if cfg.engine.name == "flower":
        raise ConfigError(f"{key}: the flower engine sends every client the same adapter (use simulation or torchdist)")
    ranks, clients = cfg.policy.lora_r, cfg.data.num_clients
    if isinstance(ranks, list) and cfg.data.source != "local" and len(ranks) != clients:  # sites: counted at build
        raise ConfigError(f"policy.lora_r lists {len(ranks)} ranks, but data.num_clients = {clients}")
