"""A frozen causal LM's reading of prompt + response as the log-linear policy's features.

φ(x, y) = Rᵀ·mean_t h_t(x ⊕ y): the last hidden state averaged over the tokens of prompt ⊕ response, projected to
the feature dimension by a seeded Gaussian matrix R. The pooled states depend only on the model and the tokens,
so they are cached on disk (under :func:`distdpo.io.cache_dir`, keyed like the reference log-probs by a hash of
the model and of the token ids); the projection is cheap and recomputed.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
from safetensors.torch import load_file, save

from distdpo.io import cache_dir, write_bytes_atomic
from distdpo.lm.logprobs import backbone_and_head
from distdpo.lm.policy import load_model_and_tokenizer, model_fingerprint


def token_ids(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Each text's tokens, cut to its last ``max_length`` (the response and the end of the prompt)."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [t[-max_length:] if t else [tokenizer.eos_token_id] for t in ids]


@torch.no_grad()
def pooled_hidden_states(model, ids: list[list[int]], pad_id: int, batch_size: int = 16) -> torch.Tensor:
    """Mean over tokens of the model's last hidden state, one row per sequence, ``[len(ids), hidden]`` float64.

    Sequences go through the model's body right-padded, in batches of similar length.
    """
    model.eval()
    body, _ = backbone_and_head(model)
    device = next(model.parameters()).device
    order = sorted(range(len(ids)), key=lambda k: len(ids[k]))  # similar lengths together: little padding
    out = torch.zeros(len(ids), model.config.get_text_config().hidden_size, dtype=torch.float64)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        length = max(len(ids[k]) for k in rows)
        input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for b, k in enumerate(rows):
            input_ids[b, : len(ids[k])] = torch.tensor(ids[k])
            mask[b, : len(ids[k])] = 1
        hidden = body(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False)
        hidden = hidden.last_hidden_state.double().cpu()
        out[rows] = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return out


def random_projection(width: int, dim: int, seed: int) -> torch.Tensor:
    """A seeded ``[width, dim]`` Gaussian matrix with entries of variance 1/dim (norms are kept on average)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(width, dim, generator=generator, dtype=torch.float64) / math.sqrt(dim)


def cached_pooled_states(model, ids: list[list[int]], pad_id: int) -> torch.Tensor:
    """:func:`pooled_hidden_states`, read from the disk cache when an identical model saw identical tokens."""
    h = hashlib.sha256(model_fingerprint(model).encode())
    for seq in ids:
        h.update(np.asarray(seq, dtype=np.int64).tobytes())
        h.update(b"|")
    path = cache_dir() / "lm_features" / f"{h.hexdigest()[:24]}.safetensors"
    if path.exists():
        cached = load_file(str(path))["pooled"]
        if cached.shape[0] == len(ids):
            return cached
    pooled = pooled_hidden_states(model, ids, pad_id)
    write_bytes_atomic(path, save({"pooled": pooled.contiguous()}))
    return pooled


def lm_pair_features(
    prompts: list[str],
    chosen: list[str],
    rejected: list[str],
    train: np.ndarray,
    dim: int,
    *,
    model: str,
    max_length: int,
    vocab_size: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(φ(x, y_w), φ(x, y_l)) of every pair from the frozen model ``model`` (``builtin:…``, a local directory or a
    hub id); a built-in model's tokenizer is trained on the training pairs ``train`` only."""
    texts = [prompts[i] + response for i in train.tolist() for response in (chosen[i], rejected[i])]
    lm, tokenizer = load_model_and_tokenizer(model, training_texts=texts, vocab_size=vocab_size, seed=seed)
    m = len(prompts)
    sequences = [p + c for p, c in zip(prompts, chosen)] + [p + r for p, r in zip(prompts, rejected)]
    ids = token_ids(tokenizer, sequences, max_length)
    pooled = cached_pooled_states(lm, ids, tokenizer.pad_token_id)
    phi = (pooled @ random_projection(pooled.shape[1], dim, seed)).numpy()
    return phi[:m], phi[m:]


__all__ = ["cached_pooled_states", "lm_pair_features", "pooled_hidden_states", "random_projection", "token_ids"]
