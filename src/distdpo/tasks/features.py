"""DPO on featurized actions (the synthetic personalized model, or text pairs' features), for all clients at once."""

from __future__ import annotations

import math

import torch

from distdpo.data.synthetic import FeaturePreferenceData
from distdpo.fingerprint import digest
from distdpo.losses import dpo_loss, margin_loss
from distdpo.policies import FeaturePolicy, LogLinearPolicy
from distdpo.tasks.base import Batch, client_metrics


class FeatureTask:
    """Clients' pairs as padded tensors ``[n, N, d]``; one autograd call gives every row's gradient.

    Rows of ``X`` are independent, so the gradient of the sum of the per-row
    losses is each row's own gradient: one backward pass serves all nodes.
    """

    def __init__(
        self,
        data: FeaturePreferenceData,
        policy: FeaturePolicy,
        reference: torch.Tensor,
        *,
        beta: float,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        _train: tuple | None = None,
    ):
        self.data, self.policy = data, policy
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.dtype, self.device = dtype, torch.device(device)
        self.reference = reference.to(torch.float64)
        self.convex = isinstance(policy, LogLinearPolicy)
        self.num_params = policy.num_params
        if _train is None:
            rows = torch.arange(data.num_clients)[:, None]
            phi_w = data.features[rows, torch.arange(data.features.shape[1]), data.chosen]
            phi_l = data.features[rows, torch.arange(data.features.shape[1]), data.rejected]
            pairs, sizes = policy.pair_inputs(phi_w, phi_l), data.sizes  # [n, N, ...]: what log_odds needs per pair
            weight = torch.ones(pairs.shape[:2], dtype=torch.float64)
        else:
            pairs, sizes, weight = _train
        self.client_sizes = sizes
        self.num_clients = len(sizes)
        self.client_names = [f"client{i}" for i in range(self.num_clients)]
        self.data_stats: dict = {}  # generated data: nothing dropped or truncated
        mask = torch.arange(pairs.shape[1])[None, :] < sizes[:, None]
        self._pairs64 = pairs
        self._weight64 = weight * mask  # padding has weight 0
        ref_rows = self.reference.expand(self.num_clients, -1)
        self._ref_log_odds64 = policy.log_odds(ref_rows, self._pairs64)
        # Hot-path copies in the engine's dtype and device, flattened over (client, pair) for index_select.
        to = dict(dtype=dtype, device=self.device)
        self._pair_shape = self._pairs64.shape[2:]
        self.pairs_flat = self._pairs64.reshape(-1, *self._pair_shape).to(**to)
        self.ref_log_odds_flat = self._ref_log_odds64.reshape(-1).to(**to)
        self.weight = self._weight64.to(**to)
        self._sizes_f = sizes.to(**to)
        self._eval_ref: tuple[torch.Tensor, torch.Tensor] | None = None

    # ---- what the algorithms use -------------------------------------------------

    def initial_params(self) -> torch.Tensor:
        return self.reference.to(self.dtype).to(self.device)

    def sample_batch(self, generator: torch.Generator, batch_size: int | None) -> Batch:
        n, N = self.weight.shape
        if batch_size is None:
            index = torch.arange(N, device=self.device).expand(n, N)
            return Batch(index, self.weight / self._sizes_f[:, None])
        # Uniform with replacement, drawn for all clients on the CPU generator so every engine agrees.
        u = torch.rand(n, batch_size, generator=generator, dtype=torch.float64)
        index = (u * self.client_sizes[:, None]).long().to(self.device)
        flat = (torch.arange(n, device=self.device)[:, None] * N + index).reshape(-1)
        return Batch(index, self.weight.reshape(-1).index_select(0, flat).reshape(n, batch_size) / batch_size)

    def loss_and_grad(self, X: torch.Tensor, nodes: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        b = batch.rows(nodes)
        flat = (nodes[:, None] * self.weight.shape[1] + b.index).reshape(-1)  # one index_select, not 2-D fancy indexing
        pairs = self.pairs_flat.index_select(0, flat).reshape(*b.index.shape, *self._pair_shape)
        ref = self.ref_log_odds_flat.index_select(0, flat).reshape(b.index.shape)
        return self._loss_and_grad(X, pairs, ref, b.scale)

    def _loss_and_grad(self, X, pairs, ref, scale):
        with torch.enable_grad():
            X = X.detach().requires_grad_(True)
            h = self.policy.log_odds(X, pairs) - ref
            per_row = (margin_loss(h, self.beta, self.loss_type, self.label_smoothing) * scale).sum(1)
            (grad,) = torch.autograd.grad(per_row.sum(), X)
        return per_row.detach(), grad

    def pooled(self, weights: torch.Tensor) -> "FeatureTask":
        """One client holding every pair, weighted so that its mean loss is Σ_i weights_i f_i."""
        mask = self._weight64 > 0
        total = int(self.client_sizes.sum())
        pair_w = (weights.to(torch.float64) * total / self.client_sizes.to(torch.float64))[:, None].expand_as(mask)
        return self._on((self._pairs64[mask][None], torch.tensor([total]), pair_w[mask][None]))

    def client(self, i: int) -> "FeatureTask":
        """Client ``i`` alone: its loss f_i (and every client's held-out pairs, for evaluation)."""
        return self._on((self._pairs64[i : i + 1], self.client_sizes[i : i + 1], self._weight64[i : i + 1]))

    def _on(self, train: tuple) -> "FeatureTask":
        """This task's data, policy and loss with training pairs ``train`` = (pairs, sizes, pair weights)."""
        return FeatureTask(
            self.data,
            self.policy,
            self.reference,
            beta=self.beta,
            loss_type=self.loss_type,
            label_smoothing=self.label_smoothing,
            dtype=self.dtype,
            device=self.device,
            _train=train,
        )

    def fingerprint(self) -> dict[str, str]:
        """What this task trains on: the clients' pairs and held-out pairs (data), the policy and reference (model)."""
        d = self.data
        data = digest([self._pairs64, self._weight64, d.eval_features, d.eval_chosen, d.eval_rejected, d.eval_sizes])
        return {"data": data, "model": digest([self.reference], type(self.policy).__name__, str(self.num_params))}

    # ---- measurement (float64, exact full batch) ------------------------------------

    def client_losses_and_grads(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f_i(θ) and ∇f_i(θ) for every client, full batch, float64."""
        X = theta.detach().to(torch.float64).cpu().expand(self.num_clients, -1)
        scale = self._weight64 / self.client_sizes.to(torch.float64)[:, None]
        return self._loss_and_grad(X, self._pairs64, self._ref_log_odds64, scale)

    def held_out_sizes(self) -> list[int]:
        return self.data.eval_sizes.tolist()

    def full_gradient(self, theta: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """∇f(θ) = Σ_i weights_i ∇f_i(θ), full batch, float64."""
        return weights.to(torch.float64) @ self.client_losses_and_grads(theta)[1]

    def objective(self, theta: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """f(θ) = Σ_i weights_i f_i(θ), float64 and differentiable (for the centralized solver)."""
        X = theta.expand(self.num_clients, -1)
        h = self.policy.log_odds(X, self._pairs64) - self._ref_log_odds64
        scale = self._weight64 / self.client_sizes.to(torch.float64)[:, None]
        losses = (margin_loss(h, self.beta, self.loss_type, self.label_smoothing) * scale).sum(1)
        return weights.to(torch.float64) @ losses

    def margin_features(self, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Log-linear only: ``(A, b, w)`` over the real pairs, float64, with margins h = Aθ − b and
        f(θ) = Σ_k w_k ℓ(h_k) = :meth:`objective` (for the exact solvers in :mod:`distdpo.solver`)."""
        if not self.convex:
            raise TypeError("margin_features needs a log-linear policy (the margin is linear in θ only then)")
        mask = self._weight64 > 0
        w = (weights.to(torch.float64)[:, None] * self._weight64 / self.client_sizes.to(torch.float64)[:, None])[mask]
        return self._pairs64[mask].to(torch.float64), self._ref_log_odds64[mask], w

    def grad_noise(self, theta: torch.Tensor) -> float:
        """σ²: variance of a one-pair stochastic gradient around ∇f_i(θ), averaged over clients."""
        n, N = self._weight64.shape
        X = theta.detach().to(torch.float64).cpu().expand(n * N, -1)
        ones = torch.ones(n * N, 1, dtype=torch.float64)
        pairs = self._pairs64.reshape(n * N, 1, *self._pairs64.shape[2:])
        _, g = self._loss_and_grad(X, pairs, self._ref_log_odds64.reshape(n * N, 1), ones)
        g = g.reshape(n, N, -1)
        w = self._weight64 / self._weight64.sum(1, keepdim=True)  # each client's sampling distribution
        mean = torch.einsum("nk,nkp->np", w, g)
        var = torch.einsum("nk,nk->n", w, ((g - mean[:, None]) ** 2).sum(-1))
        return float(var.mean())

    def evaluate(self, theta: torch.Tensor, weights: torch.Tensor) -> dict[str, float]:
        out = client_metrics(*self.client_losses_and_grads(theta), weights)
        out.update(self.held_out_metrics(theta))
        return out

    def held_out_accuracies(self, X: torch.Tensor) -> torch.Tensor:
        """Each client's held-out implicit-reward accuracy under its own row of ``X`` (``[n]``; NaN: no pairs)."""
        return self._held_out(X)[0]["rewards/accuracies"]

    def _held_out(self, X: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Per-client means of the DPO metrics, of the loss and of log π/π_ref on chosen, held-out pairs, rows ``X``."""
        d = self.data
        n = d.eval_features.shape[0]
        if self._eval_ref is None:
            ref = self.reference.expand(n, -1)
            self._eval_ref = (
                self.policy.logps(ref, d.eval_features, d.eval_chosen),
                self.policy.logps(ref, d.eval_features, d.eval_rejected),
            )
        X = X.detach().to(torch.float64).cpu()
        pol_w = self.policy.logps(X, d.eval_features, d.eval_chosen)
        pol_l = self.policy.logps(X, d.eval_features, d.eval_rejected)
        losses, m = dpo_loss(pol_w, pol_l, *self._eval_ref, self.beta, self.loss_type, self.label_smoothing)
        valid = (torch.arange(losses.shape[1])[None, :] < d.eval_sizes[:, None]).to(torch.float64)

        def client_mean(t: torch.Tensor) -> torch.Tensor:  # NaN for a client with no held-out pairs
            return (t * valid).sum(1) / valid.sum(1)

        if d.eval_true_order is not None:  # generated data: agreement with the users' true rewards
            m["true_order"] = ((m["rewards/margins"] > 0) == d.eval_true_order).to(torch.float64)
        return {k: client_mean(v) for k, v in m.items()}, client_mean(losses), client_mean(pol_w - self._eval_ref[0])

    def held_out_metrics(self, theta: torch.Tensor) -> dict[str, float]:
        """Implicit-reward accuracy and margins on every client's held-out pairs (clients without any left out)."""
        m, losses, logratio = self._held_out(theta.expand(self.data.eval_features.shape[0], -1))
        mean = lambda t: float(t.nanmean())  # noqa: E731
        acc = m["rewards/accuracies"]
        return {
            "eval_loss": mean(losses),
            "pref_accuracy": mean(acc),
            "pref_accuracy_worst": float(acc[~acc.isnan()].min()) if not acc.isnan().all() else math.nan,
            "true_pref_accuracy": mean(m["true_order"]) if "true_order" in m else math.nan,
            "reward_margin": mean(m["rewards/margins"]),
            "rewards/chosen": mean(m["rewards/chosen"]),
            "rewards/rejected": mean(m["rewards/rejected"]),
            "logratio_chosen": mean(logratio),
        }
