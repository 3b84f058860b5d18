"""Each pair's reference log-probs: they never change, so each is computed once (and disk-cached on request)."""

from __future__ import annotations

import hashlib

import torch
from safetensors.torch import load_file, save

from distdpo.io import cache_dir, write_bytes_atomic
from distdpo.lm.logprobs import TokenizedPairs, pack


class ReferenceLogps:
    """``[len(pairs), 2]`` summed log-probs of (chosen, rejected) under the policy's reference, filled on first use.

    A task built from another (``TextTask.pooled``) shares this object, so nothing is computed twice.
    """

    def __init__(self, policy, pairs: TokenizedPairs, chunk: int = 16):
        self.policy, self.pairs, self.chunk = policy, pairs, chunk
        self.values = torch.full((len(pairs), 2), float("nan"), dtype=torch.float64)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        missing = ids[torch.isnan(self.values[ids, 0])].unique()
        for start in range(0, len(missing), self.chunk):
            part = missing[start : start + self.chunk]
            batch = pack(self.pairs, part.tolist(), self.policy.pad_id).to(self.policy.device)
            chosen, rejected = self.policy.reference_logps(batch)
            self.values[part, 0], self.values[part, 1] = chosen.double().cpu(), rejected.double().cpu()
        return self.values[ids]

    def precompute(self) -> str:
        """Every pair's, from the disk cache keyed by the reference model and the tokenized pairs when present."""
        h = hashlib.sha256(self.policy.fingerprint().encode())
        for seq in (self.pairs.prompt, self.pairs.chosen, self.pairs.rejected):
            for t in seq:
                h.update(t.numpy().tobytes())
                h.update(b"|")
        path = cache_dir() / "reference_logps" / f"{h.hexdigest()[:24]}.safetensors"
        if path.exists():
            cached = load_file(str(path))["logps"]
            if cached.shape == self.values.shape:
                self.values = cached
                return f"loaded from {path}"
        self(torch.arange(len(self.pairs)))
        write_bytes_atomic(path, save({"logps": self.values.contiguous()}))
        return f"computed and cached at {path}"


__all__ = ["ReferenceLogps"]
