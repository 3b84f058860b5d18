import math

import pytest
import torch

from distdpo.losses import dpo_loss, margin_loss

BETA = 0.1


def four(h):
    """Policy/reference log-probs whose log-ratio margin is h."""
    h = torch.as_tensor(h, dtype=torch.float64)
    zero = torch.zeros_like(h)
    return h - 3.0, zero - 3.0, zero - 1.0, zero - 1.0


def test_sigmoid_at_zero_margin_is_ln2():
    losses, m = dpo_loss(*four([0.0, 0.0]), beta=BETA)
    assert torch.allclose(losses, torch.full((2,), math.log(2), dtype=torch.float64))
    assert set(m) == {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"}


def test_sigmoid_matches_naive_formula_and_is_stable():
    h = torch.linspace(-50, 50, 101, dtype=torch.float64)
    naive = -torch.log(torch.sigmoid(BETA * h))
    assert torch.allclose(margin_loss(h, BETA), naive, rtol=1e-10)
    big = margin_loss(torch.tensor([1e6, -1e6], dtype=torch.float32), BETA)
    assert torch.isfinite(big).all()
    assert big[0] == 0 and big[1] == pytest.approx(BETA * 1e6, rel=1e-6)  # naive log(sigmoid) gives inf here
    h.requires_grad_(True)
    (g,) = torch.autograd.grad(margin_loss(h * 1e5, BETA).sum(), h)
    assert torch.isfinite(g).all()


def test_label_smoothing_ipo_hinge_robust_closed_forms():
    h = torch.tensor([-2.0, 0.5, 3.0], dtype=torch.float64)
    eps = 0.2
    ls = -(1 - eps) * torch.log(torch.sigmoid(BETA * h)) - eps * torch.log(torch.sigmoid(-BETA * h))
    assert torch.allclose(margin_loss(h, BETA, "sigmoid", eps), ls)
    assert torch.allclose(margin_loss(h, BETA, "ipo"), (h - 1 / (2 * BETA)) ** 2)
    assert torch.allclose(margin_loss(h, BETA, "hinge"), torch.clamp(1 - BETA * h, min=0))
    robust = ((1 - eps) * -torch.log(torch.sigmoid(BETA * h)) - eps * -torch.log(torch.sigmoid(-BETA * h))) / (
        1 - 2 * eps
    )
    assert torch.allclose(margin_loss(h, BETA, "robust", eps), robust)


def test_robust_loss_is_unbiased_under_label_noise():
    # E over a flipped label with prob eps of the robust loss equals the clean sigmoid loss.
    h = torch.tensor([0.7, -1.3], dtype=torch.float64)
    eps = 0.3
    expected = (1 - eps) * margin_loss(h, BETA, "robust", eps) + eps * margin_loss(-h, BETA, "robust", eps)
    assert torch.allclose(expected, margin_loss(h, BETA, "sigmoid"))


def test_trl_metrics():
    pc, pr, rc, rr = (torch.tensor(v) for v in ([-1.0, -2.0], [-3.0, -1.0], [-2.0, -2.0], [-2.0, -2.0]))
    _, m = dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert torch.allclose(m["rewards/chosen"], torch.tensor([0.5, 0.0]))
    assert torch.allclose(m["rewards/rejected"], torch.tensor([-0.5, 0.5]))
    assert torch.equal(m["rewards/accuracies"], torch.tensor([1.0, 0.0]))
    assert torch.allclose(m["rewards/margins"], torch.tensor([1.0, -0.5]))


def test_unknown_loss_type():
    with pytest.raises(ValueError, match="unknown DPO loss type 'foo'"):
        margin_loss(torch.zeros(1), BETA, "foo")
