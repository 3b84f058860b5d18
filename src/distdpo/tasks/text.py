"""DPO of a causal language model on text preference pairs split across clients.

The simulator keeps one base model and one flat trainable vector (the LoRA
adapter, or all weights) per node; ``loss_and_grad`` loads a node's vector,
runs its minibatch and reads the gradient back. Reference log-probs never
change, so each pair's are computed once and cached (in memory, and on disk
when ``precompute_reference`` is set).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from distdpo.algorithms.lora import lora_layout
from distdpo.fingerprint import digest
from distdpo.lm.logprobs import TokenizedPairs, pack
from distdpo.lm.policy import CausalLMPolicy
from distdpo.losses import dpo_loss, margin_loss
from distdpo.tasks.base import Batch
from distdpo.tasks.evaluation import HELD_OUT_SUMS, ClientReport, combine, gradient, mean_grad_noise
from distdpo.tasks.reference import ReferenceLogps

log = logging.getLogger(__name__)


class TextTask:
    """Clients' pairs are index arrays into one tokenized set; the policy is shared, rows are swapped in."""

    convex = False

    def __init__(
        self,
        policy: CausalLMPolicy,
        pairs: TokenizedPairs,
        train: list[np.ndarray],
        eval: list[np.ndarray],
        client_names: list[str],
        *,
        beta: float,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        loss_pairs_per_client: int = 16,
        eval_chunk: int = 16,
        pair_weight: list[np.ndarray] | None = None,
        reference: ReferenceLogps | None = None,
        initial: torch.Tensor | None = None,
        client_sizes: list[int] | None = None,
    ):
        # client_sizes: every client's training-pair count when this process holds only some clients' data (the
        # others' train/eval are empty): batches are drawn for all n clients, as the simulator draws them.
        self.policy, self.pairs = policy, pairs
        self.device = policy.device
        self.data_stats: dict = {}  # what loading dropped, skipped and truncated (set by the builder)
        self.train = [torch.as_tensor(np.asarray(t), dtype=torch.long) for t in train]
        self.eval = [torch.as_tensor(np.asarray(e), dtype=torch.long) for e in eval]
        self.client_names = list(client_names)
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.loss_pairs_per_client, self.eval_chunk = loss_pairs_per_client, eval_chunk
        self.num_clients = len(self.train)
        self.num_params = policy.num_params
        self.held = [i for i, t in enumerate(self.train) if len(t)]  # the clients whose data this process holds
        sizes = [len(t) for t in self.train] if client_sizes is None else client_sizes
        self.client_sizes = torch.tensor(sizes, dtype=torch.long)
        if (self.client_sizes == 0).any():
            empty = [self.client_names[i] for i in np.flatnonzero(self.client_sizes.numpy() == 0)]
            raise ValueError(f"clients with no training pairs: {', '.join(empty)} (fewer clients or a larger split)")
        N = int(self.client_sizes.max())
        weight = torch.zeros(self.num_clients, N, dtype=torch.float64)
        for i, size in enumerate(self.client_sizes.tolist()):
            weight[i, :size] = 1.0 if pair_weight is None else torch.as_tensor(pair_weight[i], dtype=torch.float64)
            if i not in self.held:
                continue
            if len(self.train[i]) != size:
                raise ValueError(f"client {self.client_names[i]!r}: {len(self.train[i])} training pairs, not {size}")
        self.weight = weight
        # Reference log-probs per pair, filled on first use (a task built from another shares its tensor).
        self._reference = ReferenceLogps(policy, pairs, eval_chunk) if reference is None else reference
        # IPO on sequences uses per-token mean log-probs (as TRL and the IPO paper's LM use); the others use sums.
        self._lengths = None  # completion token counts, [len(pairs), 2]: IPO only
        if loss_type == "ipo":
            self._lengths = torch.tensor([[len(c), len(r)] for c, r in zip(pairs.chosen, pairs.rejected)]).double()
        self._initial = policy.get_flat() if initial is None else initial
        self._tokens, self._seconds, self._counting = 0, 0.0, True

    # ---- what the algorithms use -------------------------------------------------

    def initial_params(self) -> torch.Tensor:
        return self._initial.clone()

    def lora_layout(self):
        """Where the adapter's A and B lie in the flat vector (None without LoRA)."""
        return lora_layout(self.policy.model) if self.policy.lora else None

    def sample_batch(self, generator: torch.Generator, batch_size: int | None) -> Batch:
        n, N = self.weight.shape
        if batch_size is None:
            index = torch.arange(N).expand(n, N)
            return Batch(index, self.weight / self.client_sizes.to(torch.float64)[:, None])
        u = torch.rand(n, batch_size, generator=generator, dtype=torch.float64)
        index = (u * self.client_sizes[:, None]).long()
        return Batch(index, torch.gather(self.weight, 1, index) / batch_size)

    def loss_and_grad(self, X: torch.Tensor, nodes: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        losses, grads = [], []
        t0 = time.perf_counter()
        for k, node in enumerate(nodes.tolist()):
            if not len(self.train[node]):
                raise RuntimeError(f"this process does not hold client {self.client_names[node]!r}'s data")
            take = batch.scale[node] > 0
            ids = self.train[node][batch.index[node][take]]
            scale = batch.scale[node][take].to(self.policy.device, torch.float32)
            self.policy.set_flat(X[k])
            with torch.enable_grad():
                per_pair, real = self._pair_losses(ids)
                loss = (per_pair * scale).sum()
                loss.backward()
            grads.append(self.policy.flat_grad().to(X.dtype))
            self.policy.zero_grad()
            losses.append(loss.detach().to(X.dtype))
            self._tokens += real if self._counting else 0
        if self._counting:
            self._seconds += time.perf_counter() - t0
        return torch.stack(losses).cpu(), torch.stack(grads).to(X.device)

    def _pair_losses(self, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        batch = pack(self.pairs, ids.tolist(), self.policy.pad_id).to(self.policy.device)
        ref = self._normalised(ids, self.reference(ids)).to(self.policy.device, torch.float32)
        pol = self._normalised(ids, torch.stack(self.policy.logps(batch), 1))
        h = (pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1])
        return margin_loss(h, self.beta, self.loss_type, self.label_smoothing), batch.real_tokens

    def _normalised(self, ids: torch.Tensor, logps: torch.Tensor) -> torch.Tensor:
        """[B, 2] summed log-probs, divided by the completions' token counts when the loss is IPO."""
        if self._lengths is None:
            return logps
        return logps / self._lengths[ids].to(logps.device, logps.dtype)

    def pooled(self, weights: torch.Tensor) -> "TextTask":
        """One client with every training pair, each weighted so that its mean loss is Σ_i weights_i f_i."""
        total = int(self.client_sizes.sum())
        w = [np.full(len(t), float(weights[i]) * total / len(t)) for i, t in enumerate(self.train)]
        return TextTask(
            self.policy,
            self.pairs,
            [torch.cat(self.train)],
            [torch.cat(self.eval)],
            ["pooled"],
            beta=self.beta,
            loss_type=self.loss_type,
            label_smoothing=self.label_smoothing,
            loss_pairs_per_client=self.loss_pairs_per_client,
            eval_chunk=self.eval_chunk,
            pair_weight=[np.concatenate(w)],
            reference=self._reference,
            initial=self._initial,
        )

    def fingerprint(self) -> dict[str, str]:
        """What this task trains on: the tokenized pairs and the partition (data), the starting model (model)."""
        p = self.pairs
        lengths = torch.tensor([[len(a), len(b), len(c)] for a, b, c in zip(p.prompt, p.chosen, p.rejected)])
        tokens = torch.cat([t for seq in (p.prompt, p.chosen, p.rejected) for t in seq])
        parts = [lengths, tokens, self.weight, *self.train, torch.tensor([-1]), *self.eval]
        return {"data": digest(parts, "\n".join(self.client_names)), "model": self.policy.fingerprint()}

    # ---- reference log-probs ------------------------------------------------------

    def reference(self, ids: torch.Tensor) -> torch.Tensor:
        """[len(ids), 2] reference log-probs of (chosen, rejected), computed once per pair."""
        return self._reference(ids)

    def precompute_reference(self) -> str:
        """Reference log-probs of every pair, from the disk cache keyed by model and data when present."""
        return self._reference.precompute()

    # ---- measurement -------------------------------------------------------------------

    def _loss_batch(self) -> Batch:
        """The first ``loss_pairs_per_client`` training pairs of every client (fixed, for the global loss)."""
        m = min(self.loss_pairs_per_client, int(self.client_sizes.max()))
        pos = torch.arange(m).expand(self.num_clients, m)
        sizes = torch.minimum(self.client_sizes, torch.tensor(m))
        valid = pos < sizes[:, None]
        index = torch.where(valid, pos, 0)
        scale = torch.gather(self.weight, 1, index) * valid
        return Batch(index, scale / scale.sum(1, keepdim=True))

    def client_reports(self, theta: torch.Tensor, clients: list[int] | None = None) -> list[ClientReport]:
        """Each held client's loss and gradient at θ on its fixed loss pairs and its held-out sums (see
        :mod:`distdpo.tasks.evaluation`); not counted as training."""
        clients = self.held if clients is None else clients
        self._counting = False
        try:
            X = theta.to(torch.float32).expand(len(clients), -1)
            losses, grads = self.loss_and_grad(X, torch.tensor(clients, dtype=torch.long), self._loss_batch())
        finally:
            self._counting = True
        reports = [
            ClientReport(i, float(loss), grad.double().cpu(), **self._held_out_sums(theta, i))
            for i, loss, grad in zip(clients, losses.double().tolist(), grads)
        ]
        if reports:  # this process's training throughput since the last evaluation rides on its first report
            reports[0].tokens, reports[0].seconds = self._tokens, self._seconds
        self._tokens, self._seconds = 0, 0.0
        return reports

    def _every_clients_reports(self, theta: torch.Tensor) -> list[ClientReport]:
        if len(self.held) < self.num_clients:
            raise RuntimeError(
                f"this process holds {len(self.held)} of {self.num_clients} clients' data: evaluate with every "
                "site's client_reports (federated evaluation)"
            )
        return self.client_reports(theta)

    def held_out_sizes(self) -> list[int]:
        return [len(e) for e in self.eval]

    def full_gradient(self, theta: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """∇f(θ) = Σ_i p_i ∇f_i(θ) on the fixed loss pairs, the gradient that :meth:`evaluate` reports."""
        return gradient(self._every_clients_reports(theta), weights)

    def evaluate(self, theta: torch.Tensor, weights: torch.Tensor) -> dict[str, float]:
        """Global/per-client DPO loss and gradient on a fixed training subsample; held-out accuracies."""
        return combine(self._every_clients_reports(theta), weights, self.client_names)

    @torch.no_grad()
    def _held_out_sums(self, theta: torch.Tensor, client: int) -> dict:
        """One client's held-out pair count, correct preferences and HELD_OUT_SUMS at θ."""
        ids = self.eval[client]
        if len(ids) == 0:
            return {}
        self.policy.set_flat(theta)
        w, l = [], []
        for start in range(0, len(ids), self.eval_chunk):
            chunk = ids[start : start + self.eval_chunk]
            pw, pl = self.policy.logps(pack(self.pairs, chunk.tolist(), self.policy.pad_id).to(self.policy.device))
            w.append(pw.double().cpu())
            l.append(pl.double().cpu())
        ref = self._normalised(ids, self.reference(ids))
        pol = self._normalised(ids, torch.stack([torch.cat(w), torch.cat(l)], 1))
        losses, m = dpo_loss(
            pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], self.beta, self.loss_type, self.label_smoothing
        )
        per_pair = {
            "eval_loss": losses,
            "reward_margin": m["rewards/margins"],
            "rewards/chosen": m["rewards/chosen"],
            "rewards/rejected": m["rewards/rejected"],
            "logratio_chosen": pol[:, 0] - ref[:, 0],
        }
        sums = {key: float(per_pair[key].sum()) for key in HELD_OUT_SUMS}
        return {"held_out": len(ids), "correct": float(m["rewards/accuracies"].sum()), "sums": sums}

    def grad_noise(self, theta: torch.Tensor, pairs_per_client: int = 4) -> float:
        """σ²: the mean over clients of :meth:`client_grad_noise` (clients with too few pairs left out)."""
        return mean_grad_noise(self.client_grad_noise(theta, pairs_per_client).values())

    def client_grad_noise(self, theta: torch.Tensor, pairs_per_client: int = 4) -> dict[int, float | None]:
        """Each held client's variance of one-pair gradients over its first few training pairs (None: < 2 pairs)."""
        X = theta.to(torch.float32)[None]
        out: dict[int, float | None] = {}
        self._counting = False
        try:
            for i in self.held:
                m = min(pairs_per_client, int(self.client_sizes[i]))
                if m < 2:
                    out[i] = None
                    continue
                one_pair = lambda j: Batch(torch.full((self.num_clients, 1), j), torch.ones(self.num_clients, 1))  # noqa: E731
                g = torch.stack([self.loss_and_grad(X, torch.tensor([i]), one_pair(j))[1][0] for j in range(m)])
                g = g.double()
                out[i] = float(((g - g.mean(0)) ** 2).sum(1).sum() / (m - 1))
        finally:
            self._counting = True
        return out
