"""Fingerprints of what a run trained on (its data and its model), so that nothing stale is resumed or reused.

A fingerprint is ``{"data": hex, "model": hex}``: the data part hashes the pairs
as the task holds them (tokenized pairs, or features) and the client partition;
the model part hashes the starting model (weights, buffers, config). Checkpoints
and run directories store it; a resume whose fingerprint differs is refused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch

WHAT = {
    "data": "the data (the pairs as loaded and tokenized, or their features, and the client partition)",
    "model": "the model (its weights, buffers or config)",
}


def digest(tensors: Iterable[torch.Tensor], *texts: str) -> str:
    """A SHA-256 over tensors' dtypes, shapes and bytes, then some strings."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():  # (an empty tensor may have stride 0, which cannot be viewed as bytes)
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    for s in texts:
        h.update(s.encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def mismatch(stored: dict | None, current: dict, where: str) -> str | None:
    """None when ``stored`` equals ``current``; else a message saying what changed since ``where`` was written."""
    if stored == current:
        return None
    if not isinstance(stored, dict):
        return (
            f"{where} records no data fingerprint (written by an older distdpo), "
            "so it cannot be checked against this data"
        )
    changed = [WHAT[k] for k in current if stored.get(k) != current[k]]
    return f"{' and '.join(changed) or 'the fingerprint'} changed since {where} was written"


__all__ = ["digest", "mismatch"]
