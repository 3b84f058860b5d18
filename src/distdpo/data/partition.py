"""Split a dataset's items across clients: IID, Dirichlet label skew, natural (one client per label), quantity skew."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PARTITIONS = ("iid", "dirichlet", "natural", "quantity")
_MAX_DIRICHLET_TRIES = 100


def _sorted_values(labels: Sequence) -> list:
    values = set(labels)
    try:
        return sorted(values)
    except TypeError:  # mixed types: order by their text
        return sorted(values, key=str)


def _groups(labels: Sequence) -> tuple[list, list[np.ndarray]]:
    """Distinct label values (sorted) and the indices holding each."""
    values = _sorted_values(labels)
    code = {v: i for i, v in enumerate(values)}
    codes = np.fromiter((code[v] for v in labels), dtype=np.int64, count=len(labels))
    return values, [np.flatnonzero(codes == i) for i in range(len(values))]


def _split_by_counts(order: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    return [np.sort(part) for part in np.split(order, np.cumsum(counts)[:-1])]


def _apportion(total: int, proportions: np.ndarray) -> np.ndarray:
    """Integer counts summing to ``total`` closest to ``total * proportions`` (largest remainder)."""
    raw = total * proportions
    counts = np.floor(raw).astype(np.int64)
    short = total - int(counts.sum())
    if short > 0:
        counts[np.argsort(-(raw - counts), kind="stable")[:short]] += 1
    return counts


def partition(
    num_items: int,
    num_clients: int | None,
    method: str,
    *,
    labels: Sequence | None = None,
    alpha: float = 0.5,
    seed: int = 0,
    min_size: int = 1,
    quantity_alpha: float = 1.0,
) -> tuple[list[np.ndarray], list[str]]:
    """Assign items ``0..num_items-1`` to clients; returns (sorted index array per client, client names).

    ``iid``: a shuffled, equal-as-possible split. ``dirichlet``: for each label
    value, its items are divided over clients in proportions ~ Dir(``alpha``)
    (smaller α = more label skew), redrawn until every client has at least
    ``min_size`` items. ``natural``: one client per distinct label value, in
    sorted order, named by the value. ``quantity``: client sizes ~
    ``min_size`` + Dir(``quantity_alpha``) share of the rest, over a shuffled order.
    Non-natural clients are named ``client0``, ``client1``, ...
    """
    if method not in PARTITIONS:
        raise ValueError(f"unknown partition method {method!r}; expected one of {PARTITIONS}")
    if num_items < 1:
        raise ValueError(f"num_items must be >= 1, got {num_items}")
    if labels is not None and len(labels) != num_items:
        raise ValueError(f"labels has {len(labels)} entries but num_items is {num_items}")
    if method in ("dirichlet", "natural") and labels is None:
        raise ValueError(f"partition method {method!r} needs labels (one per item)")

    if method == "natural":
        values, groups = _groups(labels)
        if num_clients is not None and num_clients != len(values):
            raise ValueError(
                f"num_clients={num_clients} but the labels have {len(values)} distinct values; "
                "natural partitioning makes one client per value (pass num_clients=None)"
            )
        return groups, [str(v) for v in values]

    if num_clients is None:
        raise ValueError(f"num_clients is required for partition method {method!r}")
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if num_clients > num_items:
        raise ValueError(f"num_clients={num_clients} is more than num_items={num_items}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    if method != "iid" and min_size * num_clients > num_items:
        raise ValueError(f"min_size={min_size} for {num_clients} clients needs more than num_items={num_items} items")

    rng = np.random.default_rng(seed)
    names = [f"client{i}" for i in range(num_clients)]

    if method == "iid":
        return [np.sort(p) for p in np.array_split(rng.permutation(num_items), num_clients)], names

    if method == "quantity":
        if not quantity_alpha > 0:
            raise ValueError(f"quantity_alpha must be > 0, got {quantity_alpha}")
        proportions = rng.dirichlet(np.full(num_clients, float(quantity_alpha)))
        counts = min_size + _apportion(num_items - min_size * num_clients, proportions)
        return _split_by_counts(rng.permutation(num_items), counts), names

    # dirichlet label skew
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    _, groups = _groups(labels)
    for _ in range(_MAX_DIRICHLET_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for group in groups:
            shuffled = rng.permutation(group)
            counts = _apportion(len(group), rng.dirichlet(np.full(num_clients, float(alpha))))
            for i, piece in enumerate(np.split(shuffled, np.cumsum(counts)[:-1])):
                parts[i].append(piece)
        clients = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(c) for c in clients) >= min_size:
            return clients, names
    raise ValueError(
        f"dirichlet partition: no draw in {_MAX_DIRICHLET_TRIES} gave all {num_clients} clients at least "
        f"min_size={min_size} items with alpha={alpha}; use a larger alpha, fewer clients or a smaller min_size"
    )


def prompt_key(prompt: str) -> str:
    """What makes two prompts the same prompt for held-out grouping: the text with whitespace runs collapsed."""
    return " ".join(prompt.split())


def drop_duplicates(client_indices: list[np.ndarray], keys: Sequence) -> tuple[list[np.ndarray], int]:
    """Keep the first of each run of items with equal ``keys`` inside a client; returns (clients, number dropped)."""
    out, dropped = [], 0
    for idx in client_indices:
        seen: set = set()
        keep = []
        for i in np.asarray(idx, dtype=np.int64):
            if keys[i] in seen:
                dropped += 1
            else:
                seen.add(keys[i])
                keep.append(i)
        out.append(np.asarray(keep, dtype=np.int64))
    return out, dropped


def train_eval_split(
    client_indices: list[np.ndarray],
    eval_fraction: float,
    seed: int = 0,
    min_eval: int = 1,
    groups: Sequence | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Hold out whole groups (prompts) of items across all clients; returns (train, eval) sorted index arrays.

    ``groups[i]`` is item i's group (its prompt key; default: every item its own group). A held-out group is
    held out on every client that has it, so no held-out prompt is ever trained on. Groups are drawn in a seeded
    order until about ``eval_fraction`` of all items are held out; then each client that has no training item
    gets its smallest held-out group back, and each client with at least 2 items but fewer than ``min_eval``
    held-out ones gets one more of its groups held out, as long as no client loses its last training item.
    """
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if min_eval < 0:
        raise ValueError(f"min_eval must be >= 0, got {min_eval}")
    clients = [np.asarray(idx, dtype=np.int64) for idx in client_indices]
    if eval_fraction == 0:
        return [np.sort(c) for c in clients], [np.zeros(0, dtype=np.int64) for _ in clients]
    all_items = np.concatenate(clients) if clients else np.zeros(0, dtype=np.int64)
    if groups is None:
        code = {int(i): int(i) for i in all_items}
    else:
        ids: dict = {}
        code = {int(i): ids.setdefault(groups[int(i)], len(ids)) for i in all_items}
    members: dict[int, list[tuple[int, int]]] = {}  # group -> [(client, item)]
    for c, idx in enumerate(clients):
        for i in idx.tolist():
            members.setdefault(code[i], []).append((c, i))
    rng = np.random.default_rng(seed)
    order = [list(members)[j] for j in rng.permutation(len(members))]
    held: set[int] = set()
    target, count = eval_fraction * len(all_items), 0
    for g in order:
        if count >= target:
            break
        held.add(g)
        count += len(members[g])

    def counts() -> tuple[np.ndarray, np.ndarray]:
        n_eval = np.zeros(len(clients), dtype=np.int64)
        for g in held:
            for c, _ in members[g]:
                n_eval[c] += 1
        return np.array([len(c) for c in clients]) - n_eval, n_eval

    n_train, _ = counts()
    for c in np.flatnonzero(n_train == 0):  # every client keeps something to train on
        mine = sorted((g for g in held if any(cc == c for cc, _ in members[g])), key=lambda g: len(members[g]))
        if mine:
            held.discard(mine[0])
    n_train, n_eval = counts()
    rank = {g: k for k, g in enumerate(order)}
    for c, idx in enumerate(clients):
        if len(idx) < 2 or n_eval[c] >= min_eval:
            continue
        for g in sorted({code[i] for i in idx.tolist()} - held, key=rank.__getitem__):
            loses = np.bincount([cc for cc, _ in members[g]], minlength=len(clients))
            if np.all((n_train - loses >= 1) | (loses == 0)):
                held.add(g)
                n_train, n_eval = counts()
                if n_eval[c] >= min_eval:
                    break
    train = [np.sort(np.array([i for i in idx.tolist() if code[i] not in held], dtype=np.int64)) for idx in clients]
    evals = [np.sort(np.array([i for i in idx.tolist() if code[i] in held], dtype=np.int64)) for idx in clients]
    return train, evals


__all__ = ["PARTITIONS", "drop_duplicates", "partition", "prompt_key", "train_eval_split"]
