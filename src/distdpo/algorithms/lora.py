"""Federated aggregation of LoRA adapters, and how far it is from averaging the clients' updates W_i = B_i A_i.

* ``factors`` (FedIT): average A and B separately; B̄Ā ≠ Σ p_i B_i A_i in general.
* ``freeze_a`` (FFA-LoRA): A stays at its seeded initialisation on every site and only B is trained and sent, so
  Σ p_i B_i A = B̄ A exactly (the policy leaves A out of the trainable vector).
* ``product``: form Σ p_i B_i A_i exactly and re-factor it to rank r by a truncated SVD; every client gets the same
  new factors. The error is then the truncation's residual.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distdpo.config import ALGORITHM_SPECS, Config, ConfigError


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


def check_lora_aggregation(cfg: Config) -> None:
    """``algorithm.lora_aggregation`` other than ``factors`` needs a LoRA causal LM (and product a federated run)."""
    mode = cfg.algorithm.lora_aggregation
    if mode == "factors":
        return
    key = f"algorithm.lora_aggregation = {mode!r}"
    if cfg.policy.kind != "causal_lm" or cfg.policy.lora_r == 0:
        raise ConfigError(f"{key} needs a LoRA policy (policy.kind = 'causal_lm' and policy.lora_r > 0)")
    if cfg.engine.name == "flower":
        raise ConfigError(f"{key}: the flower engine averages factors only")
    if mode == "product" and ALGORITHM_SPECS[cfg.algorithm.name].family != "federated":
        raise ConfigError(f"{key} aggregates at a server: it needs a federated algorithm, not {cfg.algorithm.name!r}")
