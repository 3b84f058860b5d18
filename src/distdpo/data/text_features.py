"""Text preference pairs as a log-linear policy's features: hashed n-grams, TF-IDF-weighted, and the padded layout.

The log-linear policy π_θ(y|x) ∝ π_ref(y|x)·exp(θᵀφ(x, y)) with π_ref uniform over the two responses of a pair
sees a pair only through φ(x, y_w) − φ(x, y_l), so DPO on these features is a logistic regression with an exact
optimum. ``"hashed"`` features are

* the response's word and word-bigram counts, hashed into ``dim − dim // 2`` buckets, and
* prompt×response interactions: the response's word counts kept only in the buckets of words the prompt also
  uses (the elementwise product of the two hashed bags of words), in the other ``dim // 2`` buckets,

then TF-IDF-weighted (sublinear counts) and L2-normalised with scikit-learn. The inverse document frequencies
are fitted on the responses of training pairs only, so nothing about the held-out split reaches the features
of a training pair. A prompt's own words are not features: they are the same for both responses and cancel.
"""

from __future__ import annotations

import numpy as np
import torch

from distdpo.data.synthetic import FeaturePreferenceData

FEATURE_KINDS = ("hashed", "lm")


def hashed_features(prompts: list[str], responses: list[str], fit_rows: np.ndarray, dim: int) -> np.ndarray:
    """φ(prompt_k, response_k) for every row k, ``[len(responses), dim]`` float64; IDF fitted on ``fit_rows``."""
    import scipy.sparse as sp
    from sklearn.feature_extraction.text import HashingVectorizer, TfidfTransformer

    if dim < 1:
        raise ValueError(f"the feature dimension must be at least 1, got {dim}")
    interaction_dim = dim // 2
    ngrams = HashingVectorizer(n_features=dim - interaction_dim, ngram_range=(1, 2), alternate_sign=False, norm=None)
    blocks = [ngrams.transform(responses)]
    if interaction_dim:
        words = HashingVectorizer(n_features=interaction_dim, alternate_sign=False, norm=None)
        shared = words.transform(prompts).sign()  # 1 where the prompt uses a word of that bucket
        blocks.append(words.transform(responses).multiply(shared))
    counts = sp.hstack(blocks, format="csr")
    tfidf = TfidfTransformer(norm="l2", sublinear_tf=True).fit(counts[np.asarray(fit_rows, dtype=np.int64)])
    return tfidf.transform(counts).toarray().astype(np.float64)


def pair_features(
    kind: str, prompts: list[str], chosen: list[str], rejected: list[str], train: np.ndarray, dim: int, **lm
) -> tuple[np.ndarray, np.ndarray]:
    """(φ(x, y_w), φ(x, y_l)) of every pair, ``[num_pairs, dim]`` each; statistics come from the pairs ``train``.

    ``kind`` is ``"hashed"`` or ``"lm"`` (the keyword arguments ``lm`` go to
    :func:`distdpo.lm.features.lm_pair_features`).
    """
    if kind == "hashed":
        m = len(prompts)
        rows = np.concatenate([train, train + m])  # a training pair's chosen and rejected responses
        phi = hashed_features(prompts + prompts, list(chosen) + list(rejected), rows, dim)
        return phi[:m], phi[m:]
    if kind == "lm":
        from distdpo.lm.features import lm_pair_features

        return lm_pair_features(prompts, chosen, rejected, train, dim, **lm)
    raise ValueError(f"unknown feature kind {kind!r}; expected one of {', '.join(FEATURE_KINDS)}")


def _padded(phi_w: np.ndarray, phi_l: np.ndarray, clients: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each client's pairs as ``[n, N, 2, d]`` (action 0 = chosen, 1 = rejected), zero-padded; and the sizes."""
    sizes = torch.tensor([len(c) for c in clients], dtype=torch.long)
    features = torch.zeros(len(clients), max(1, int(sizes.max())), 2, phi_w.shape[1], dtype=torch.float64)
    for i, rows in enumerate(clients):
        features[i, : len(rows), 0] = torch.from_numpy(phi_w[rows])
        features[i, : len(rows), 1] = torch.from_numpy(phi_l[rows])
    return features, sizes


def text_feature_data(
    phi_w: np.ndarray, phi_l: np.ndarray, train: list[np.ndarray], held_out: list[np.ndarray]
) -> FeaturePreferenceData:
    """Clients' training and held-out pairs of text features in the layout of the synthetic model.

    There is no ground truth (``theta_star``, ``theta_users``, ``eval_true_order`` are None) and the reference is
    uniform over each pair (``theta_ref`` = 0).
    """
    features, sizes = _padded(phi_w, phi_l, train)
    eval_features, eval_sizes = _padded(phi_w, phi_l, held_out)
    n = len(train)
    return FeaturePreferenceData(
        features=features,
        chosen=torch.zeros(n, features.shape[1], dtype=torch.long),
        rejected=torch.ones(n, features.shape[1], dtype=torch.long),
        sizes=sizes,
        eval_features=eval_features,
        eval_chosen=torch.zeros(n, eval_features.shape[1], dtype=torch.long),
        eval_rejected=torch.ones(n, eval_features.shape[1], dtype=torch.long),
        eval_sizes=eval_sizes,
        theta_ref=torch.zeros(phi_w.shape[1], dtype=torch.float64),
    )


__all__ = ["FEATURE_KINDS", "hashed_features", "pair_features", "text_feature_data"]
