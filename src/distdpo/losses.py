"""DPO-family losses as pure functions of policy and reference log-probabilities.

Every loss depends on the pair only through the log-ratio margin
``h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))``, so the
functions below take the four log-prob tensors (any matching shape) and return
per-pair losses plus TRL-named metrics. All are written with ``logsigmoid``
so that large margins neither overflow nor lose precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distdpo.config import LOSS_TYPES  # kept with the config (importable without torch)


def check_loss_type(loss_type: str, label_smoothing: float = 0.0) -> None:
    """Raise ``ValueError`` for an unknown loss or an impossible smoothing value."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown DPO loss type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")


def margin_loss(h: torch.Tensor, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair loss from the log-ratio margin ``h`` (elementwise)."""
    if loss_type == "sigmoid":
        # cDPO (label-smoothed DPO) when label_smoothing > 0: labels flipped with prob ε.
        loss = -F.logsigmoid(beta * h) * (1 - label_smoothing)
        if label_smoothing:
            loss = loss - F.logsigmoid(-beta * h) * label_smoothing
        return loss
    if loss_type == "robust":
        # Chowdhury et al. 2024: unbiased under label noise ε (TRL's "robust").
        loss = -F.logsigmoid(beta * h) * (1 - label_smoothing) + F.logsigmoid(-beta * h) * label_smoothing
        return loss / (1 - 2 * label_smoothing)
    if loss_type == "hinge":
        return torch.relu(1 - beta * h)
    if loss_type == "ipo":
        # Azar et al. 2023: squared distance of the margin to 1/(2β).
        return (h - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown DPO loss type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair DPO loss and per-pair TRL metrics (``rewards/chosen`` … ``rewards/margins``).

    Metrics are tensors of the input shape (reduce them as you need); the
    implicit rewards are ``β·(log π − log π_ref)`` and carry no gradient.
    """
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    losses = margin_loss(chosen_logratios - rejected_logratios, beta, loss_type, label_smoothing)
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    metrics = {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype),
        "rewards/margins": chosen_rewards - rejected_rewards,
    }
    return losses, metrics
