"""Communication graphs and mixing matrices for decentralized optimization.

A topology is an undirected connected graph on nodes ``0..n-1`` plus a mixing
matrix ``W`` (doubly stochastic, supported on edges and the diagonal) used for
gossip averaging ``X <- W @ X``. The speed of consensus is governed by
``lambda = max(|lambda_2|, |lambda_n|)`` and the spectral gap ``1 - lambda``.
Time-varying topologies (one-peer exponential) cycle through a schedule of
non-symmetric ``W_t``.
"""

from __future__ import annotations

import json
import math
import operator
import os
import sys
from dataclasses import dataclass
from typing import Any, TextIO

import networkx as nx
import numpy as np

__all__ = [
    "GRAPHS",
    "WEIGHTS",
    "Topology",
    "TopologyError",
    "build_graph",
    "check_mixing_matrix",
    "graph_command",
    "load_edge_list",
    "make_topology",
    "mixing_matrix",
    "spectral_info",
]

GRAPHS = (
    "path",
    "ring",
    "star",
    "complete",
    "torus",
    "grid",
    "hypercube",
    "exponential",
    "erdos_renyi",
    "one_peer_exponential",
)
WEIGHTS = ("metropolis", "max_degree", "lazy_metropolis", "lazy_max_degree")

_EDGE_LIST_SUFFIXES = (".txt", ".edges", ".csv")


class TopologyError(ValueError):
    """Invalid graph, mixing matrix or topology option."""


# --------------------------------------------------------------------------- graphs


def _check_num_nodes(num_nodes: Any) -> int:
    if isinstance(num_nodes, bool):
        raise TopologyError(f"num_nodes must be a positive integer, got {num_nodes!r}")
    try:
        n = operator.index(num_nodes)
    except TypeError:
        raise TopologyError(f"num_nodes must be a positive integer, got {num_nodes!r}") from None
    if n < 1:
        raise TopologyError(f"num_nodes must be >= 1, got {n}")
    return n


def _grid_shape(name: str, n: int) -> tuple[int, int]:
    # Most square factorisation keeps the diameter (and hence mixing time) smallest.
    rows = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    if rows == 1:
        raise TopologyError(
            f"graph '{name}' needs num_nodes = rows x cols with rows, cols >= 2, "
            f"but {n} has no such factorisation; use a composite number of nodes (e.g. {n + 1 if n > 3 else 4})"
        )
    return rows, n // rows


def _relabel(graph: nx.Graph) -> nx.Graph:
    """Relabel nodes to 0..n-1 in sorted order (insertion order if labels are unorderable)."""
    try:
        return nx.convert_node_labels_to_integers(graph, ordering="sorted")
    except TypeError:
        return nx.convert_node_labels_to_integers(graph, ordering="default")


def _shift_union_graph(n: int, shifts: list[int]) -> nx.Graph:
    g = nx.empty_graph(n)
    for s in shifts:
        for i in range(n):
            j = (i + s) % n
            if j != i:
                g.add_edge(i, j)
    return g


def _one_peer_period(n: int) -> int:
    return max(1, math.ceil(math.log2(n))) if n > 1 else 1


def build_graph(name: str, num_nodes: int, *, seed: int = 0, er_p: float | None = None) -> nx.Graph:
    """Build the named communication graph on nodes ``0..num_nodes-1``.

    ``er_p`` is the edge probability for ``erdos_renyi`` (ignored by the other graphs);
    ``one_peer_exponential`` returns the union of its per-round graphs over one period.
    """
    if name not in GRAPHS:
        raise TopologyError(f"unknown graph {name!r}; expected one of {', '.join(GRAPHS)} or an edge-list file")
    n = _check_num_nodes(num_nodes)

    if name == "path":
        g = nx.path_graph(n)
    elif name == "ring":
        if n < 3:
            raise TopologyError(f"graph 'ring' needs num_nodes >= 3, got {n} (use 'path' or 'complete' for 1-2 nodes)")
        g = nx.cycle_graph(n)
    elif name == "star":
        g = nx.star_graph(n - 1)  # star_graph(k) has k leaves plus the centre 0
    elif name == "complete":
        g = nx.complete_graph(n)
    elif name in ("torus", "grid"):
        rows, cols = _grid_shape(name, n)
        # nx.Graph collapses the duplicate wrap-around edges of a side of length 2.
        g = _relabel(nx.grid_2d_graph(rows, cols, periodic=(name == "torus")))
    elif name == "hypercube":
        if n & (n - 1):
            lo = 1 << (n.bit_length() - 1)
            raise TopologyError(f"graph 'hypercube' needs num_nodes to be a power of 2, got {n} (try {lo} or {lo * 2})")
        # hypercube_graph(0) is empty in networkx; a 0-dimensional cube is one node.
        g = _relabel(nx.hypercube_graph(n.bit_length() - 1)) if n > 1 else nx.empty_graph(1)
    elif name == "exponential":
        # i -- i + 2^k for k = 0..floor(log2(n-1)).
        g = _shift_union_graph(n, [1 << k for k in range((n - 1).bit_length())] if n > 1 else [])
    elif name == "erdos_renyi":
        p = min(1.0, 2.0 * math.log(n) / n) if er_p is None else float(er_p)
        if not 0.0 <= p <= 1.0:
            raise TopologyError(f"erdos_renyi edge probability must be in [0, 1], got {er_p}")
        g = nx.erdos_renyi_graph(n, p, seed=seed)
        if not nx.is_connected(g):
            k = nx.number_connected_components(g)
            raise TopologyError(
                f"erdos_renyi graph with {n} nodes, p={p:.4g}, seed={seed} is disconnected ({k} components); "
                f"use a larger p (e.g. er_p={min(1.0, max(2 * p, 2 * math.log(n) / n)):.3g}) or another seed"
            )
    else:  # one_peer_exponential
        tau = _one_peer_period(n)
        g = _shift_union_graph(n, [1 << k for k in range(tau)])
    g.graph["name"] = name
    return g


def _parse_label(token: str, where: str, line: str) -> int:
    try:
        v = int(token)
    except ValueError:
        raise TopologyError(f"{where}: expected two integer node labels 'u v', got {line!r}") from None
    if v < 0:
        raise TopologyError(f"{where}: node labels must be >= 0, got {line!r}")
    return v


def load_edge_list(path: str | os.PathLike) -> nx.Graph:
    """Read an undirected graph from a text file of ``u v`` integer pairs.

    Blank lines and ``#`` comments are allowed; separators may be whitespace or commas.
    Labels must be exactly ``0..n-1``; duplicate edges are merged.
    """
    fname = os.fspath(path)
    try:
        with open(fname, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise TopologyError(f"cannot read edge list {fname!r}: {e.strerror or e}") from None
    g = nx.Graph()
    for lineno, raw in enumerate(lines, start=1):
        text = raw.split("#", 1)[0].strip()
        if not text:
            continue
        where = f"{fname}:{lineno}"
        tokens = text.replace(",", " ").split()
        if len(tokens) != 2:
            raise TopologyError(f"{where}: expected two integer node labels 'u v', got {raw.strip()!r}")
        u, v = (_parse_label(t, where, raw.strip()) for t in tokens)
        if u == v:
            raise TopologyError(f"{where}: self-loop {u} -- {v} is not allowed (the diagonal of W is implicit)")
        g.add_edge(u, v)
    if g.number_of_nodes() == 0:
        raise TopologyError(f"edge list {fname!r} contains no edges")
    n = max(g.nodes) + 1
    if n != g.number_of_nodes():  # some of 0..n-1 are missing; list a few without building range(n)
        missing, expected = [], 0
        for label in sorted(g.nodes):
            missing += range(expected, min(label, expected + 10 - len(missing)))
            expected = label + 1
            if len(missing) >= 10:
                break
        count = n - g.number_of_nodes()
        shown = ", ".join(map(str, missing[:10])) + (", ..." if count > 10 else "")
        raise TopologyError(
            f"edge list {fname!r}: node labels must be 0..{g.number_of_nodes() - 1} (one per node, none missing); "
            f"the largest label is {n - 1}, so {count} label(s) are missing: {shown}"
        )
    # Deterministic node order 0..n-1 regardless of the order edges appear in.
    out = nx.Graph()
    out.add_nodes_from(range(n))
    out.add_edges_from(g.edges)
    out.graph["name"] = fname
    return out


# --------------------------------------------------------------------------- mixing matrices


def _adjacency(graph: nx.Graph, what: str = "graph") -> np.ndarray:
    """Boolean adjacency of a graph on nodes 0..n-1, self-loops dropped."""
    n = graph.number_of_nodes()
    if set(graph.nodes) != set(range(n)):
        raise TopologyError(
            f"{what} nodes must be labelled 0..{n - 1}; relabel with nx.convert_node_labels_to_integers"
        )
    a = np.zeros((n, n), dtype=bool)
    for u, v in graph.edges:
        if u != v:
            a[u, v] = a[v, u] = True
    return a


def mixing_matrix(graph: nx.Graph, weights: str = "metropolis") -> np.ndarray:
    """Symmetric doubly stochastic mixing matrix of ``graph`` by the named weight rule."""
    if weights not in WEIGHTS:
        raise TopologyError(f"unknown weights {weights!r}; expected one of {', '.join(WEIGHTS)}")
    a = _adjacency(graph)
    n = a.shape[0]
    deg = a.sum(axis=1).astype(np.float64)
    base = weights.removeprefix("lazy_")
    if base == "metropolis":
        w = np.where(a, 1.0 / (1.0 + np.maximum.outer(deg, deg)), 0.0)
    else:  # max_degree
        w = np.where(a, 1.0 / (1.0 + (deg.max() if n else 0.0)), 0.0)
    w[np.diag_indices(n)] = 1.0 - w.sum(axis=1)
    if weights.startswith("lazy_"):
        # Lazy version shifts the spectrum into [0, 1]: no oscillating (negative) modes.
        w = 0.5 * (np.eye(n) + w)
    return w


def check_mixing_matrix(
    W: np.ndarray,
    num_nodes: int | None = None,
    graph: nx.Graph | None = None,
    *,
    symmetric: bool = True,
    tol: float = 1e-8,
    connected: bool = True,
) -> None:
    """Raise ``TopologyError`` saying precisely why ``W`` is not a valid mixing matrix.

    Checks shape, finiteness, nonnegativity, symmetry (if ``symmetric``), double
    stochasticity, support within ``graph``'s edges plus the diagonal, and (if
    ``connected``) that the support graph of ``W`` is connected. Time-varying
    schedules pass ``connected=False`` since only their union must be connected.
    """
    try:
        w = np.asarray(W, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TopologyError(f"mixing matrix must be a numeric array: {e}") from None
    if w.ndim != 2 or w.shape[0] != w.shape[1]:
        raise TopologyError(f"mixing matrix must be a square 2-D matrix, got shape {w.shape}")
    n = w.shape[0]
    if n == 0:
        raise TopologyError("mixing matrix is empty (0x0)")
    if num_nodes is not None and n != num_nodes:
        raise TopologyError(f"mixing matrix has wrong size: expected {num_nodes}x{num_nodes}, got {n}x{n}")
    if not np.isfinite(w).all():
        i, j = np.argwhere(~np.isfinite(w))[0]
        raise TopologyError(f"mixing matrix contains NaN/inf, e.g. W[{i}, {j}] = {w[i, j]}")
    if (w < -tol).any():
        i, j = np.unravel_index(np.argmin(w), w.shape)
        raise TopologyError(f"mixing matrix has negative entries, e.g. W[{i}, {j}] = {w[i, j]:.6g}")
    if symmetric:
        asym = np.abs(w - w.T)
        if asym.max() > tol:
            i, j = np.unravel_index(np.argmax(asym), w.shape)
            raise TopologyError(
                f"mixing matrix is not symmetric: max |W - W^T| = {asym[i, j]:.3g} at ({i}, {j}) "
                f"(W[{i}, {j}] = {w[i, j]:.6g}, W[{j}, {i}] = {w[j, i]:.6g})"
            )
    for axis, label in ((1, "row"), (0, "column")):
        sums = w.sum(axis=axis)
        k = int(np.argmax(np.abs(sums - 1.0)))
        if abs(sums[k] - 1.0) > tol:
            raise TopologyError(
                f"mixing matrix is not doubly stochastic: {label} {k} sums to {sums[k]:.10g}, expected 1"
            )
    support = (w > tol) | (w.T > tol)
    support[np.diag_indices(n)] = False
    if graph is not None:
        if graph.number_of_nodes() != n:
            raise TopologyError(f"mixing matrix is {n}x{n} but the graph has {graph.number_of_nodes()} nodes")
        bad = support & ~_adjacency(graph)
        if bad.any():
            i, j = np.argwhere(bad)[0]
            v = w[i, j] if w[i, j] > tol else w[j, i]
            raise TopologyError(
                f"mixing matrix puts weight {v:.6g} on pair ({i}, {j}), which is not an edge of the graph"
            )
    if connected and n > 1:
        k = nx.number_connected_components(nx.from_numpy_array(support.astype(np.int8)))
        if k > 1:
            raise TopologyError(
                f"mixing matrix is disconnected: its support graph has {k} components, "
                "so nodes can never reach consensus"
            )


def spectral_info(W: np.ndarray) -> dict[str, float]:
    """Spectrum summary of a doubly stochastic ``W``: lambda2, lambda_n, lambda, spectral_gap.

    Symmetric ``W``: eigenvalues via ``eigvalsh`` and ``lambda = max(|lambda2|, |lambda_n|)``.
    Non-symmetric ``W``: ``lambda`` is the second largest singular value (the contraction
    factor of ``W`` on the disagreement subspace), while ``lambda2``/``lambda_n`` are the
    second largest and the smallest real parts of the eigenvalues.
    """
    w = np.asarray(W, dtype=np.float64)
    if w.ndim != 2 or w.shape[0] != w.shape[1] or w.shape[0] == 0:
        raise TopologyError(f"spectral_info needs a non-empty square matrix, got shape {w.shape}")
    n = w.shape[0]
    if n == 1:
        return {"lambda2": 0.0, "lambda_n": 0.0, "lambda": 0.0, "spectral_gap": 1.0}
    if np.allclose(w, w.T, rtol=0.0, atol=1e-12):
        ev = np.linalg.eigvalsh(0.5 * (w + w.T))  # ascending
        lam2, lamn = float(ev[-2]), float(ev[0])
        lam = max(abs(lam2), abs(lamn))
    else:
        re = np.sort(np.linalg.eigvals(w).real)[::-1]
        lam2, lamn = float(re[1]), float(re[-1])
        lam = float(np.linalg.svd(w, compute_uv=False)[1])
    return {"lambda2": lam2, "lambda_n": lamn, "lambda": lam, "spectral_gap": 1.0 - lam}


def _one_peer_schedule(n: int) -> list[np.ndarray]:
    """W_t = (I + P_t)/2 with P_t the shift i -> (i + 2^t) mod n, t = 0..tau-1 (Ying et al. 2021)."""
    eye = np.eye(n)
    sched = []
    for t in range(_one_peer_period(n)):
        p = np.roll(eye, (1 << t) % n, axis=1)  # p[i, (i + s) % n] = 1
        sched.append(0.5 * (eye + p))
    return sched


# --------------------------------------------------------------------------- topology


@dataclass
class Topology:
    """A connected communication graph with its (possibly time-varying) mixing matrices."""

    name: str
    graph: nx.Graph
    weights: str
    W: np.ndarray
    schedule: list[np.ndarray] | None = None

    def matrix(self, round_index: int) -> np.ndarray:
        """Mixing matrix used at gossip round ``round_index``."""
        if self.schedule:
            return self.schedule[round_index % len(self.schedule)]
        return self.W

    @property
    def num_nodes(self) -> int:
        return int(self.W.shape[0])

    @property
    def num_edges(self) -> int:
        return sum(1 for u, v in self.graph.edges if u != v)

    @property
    def time_varying(self) -> bool:
        return bool(self.schedule) and len(self.schedule) > 1

    def neighbors(self, round_index: int) -> list[list[int]]:
        """For each node i, the sorted nodes j != i exchanging with i at this round."""
        w = self.matrix(round_index)
        s = (w > 0) | (w.T > 0)
        np.fill_diagonal(s, False)
        return [np.flatnonzero(row).tolist() for row in s]

    def messages_per_round(self, round_index: int) -> int:
        """Directed transfers needed for ``W_t @ X``: off-diagonal nonzeros of ``W_t``."""
        w = self.matrix(round_index)
        return int(np.count_nonzero(w) - np.count_nonzero(np.diag(w)))

    def spectral(self) -> dict[str, float]:
        """Spectral summary; for a schedule, the per-round rate of the period product."""
        if not self.time_varying:
            return spectral_info(self.W)
        tau = len(self.schedule)
        m = np.eye(self.num_nodes)
        for w in self.schedule:  # M = W_{tau-1} ... W_0
            m = w @ m
        sigma2 = float(np.linalg.svd(m, compute_uv=False)[1]) if self.num_nodes > 1 else 0.0
        # Clip round-off: an exact-averaging product gives sigma2 ~ 1e-16.
        lam = max(sigma2, 0.0) ** (1.0 / tau) if sigma2 > 1e-12 else 0.0
        first = spectral_info(self.schedule[0])
        return {"lambda2": first["lambda2"], "lambda_n": first["lambda_n"], "lambda": lam, "spectral_gap": 1.0 - lam}

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary: sizes, degrees, connectivity and spectral quantities."""
        degs = [sum(1 for v in self.graph.neighbors(u) if v != u) for u in self.graph.nodes]
        spec = self.spectral()
        out: dict[str, Any] = {
            "graph": self.name,
            "num_nodes": self.num_nodes,
            "num_edges": self.num_edges,
            "connected": bool(nx.is_connected(self.graph)),
            "weights": self.weights,
            "time_varying": self.time_varying,
            "period": len(self.schedule) if self.schedule else 1,
            "min_degree": int(min(degs)),
            "max_degree": int(max(degs)),
            "messages_per_round": self.messages_per_round(0),
        }
        out.update({k: float(v) for k, v in spec.items()})
        return out


def _looks_like_path(graph: Any) -> bool:
    if isinstance(graph, os.PathLike):
        return True
    s = str(graph)
    return os.path.isfile(s) or "/" in s or os.sep in s or s.lower().endswith(_EDGE_LIST_SUFFIXES)


def _load_matrix(matrix: np.ndarray | str | os.PathLike) -> np.ndarray:
    if isinstance(matrix, (str, os.PathLike)):
        fname = os.fspath(matrix)
        try:
            if fname.endswith(".npy"):
                return np.load(fname, allow_pickle=False)
            return np.loadtxt(fname, delimiter="," if fname.endswith(".csv") else None, ndmin=2)
        except (OSError, ValueError) as e:
            raise TopologyError(f"cannot read mixing matrix {fname!r}: {e}") from None
    return np.asarray(matrix)


def make_topology(
    graph: str | os.PathLike | nx.Graph,
    num_nodes: int | None = None,
    *,
    weights: str = "metropolis",
    seed: int = 0,
    er_p: float | None = None,
    matrix: np.ndarray | str | os.PathLike | None = None,
) -> Topology:
    """Build a validated topology from a graph name, an edge-list file or a networkx graph.

    ``matrix`` (array or ``.npy``/``.csv``/text file) overrides the weight rule after
    being checked against the graph. Raises ``TopologyError`` for any invalid input,
    including a disconnected graph (consensus would be impossible).
    """
    if weights not in WEIGHTS:
        raise TopologyError(f"unknown weights {weights!r}; expected one of {', '.join(WEIGHTS)}")
    if num_nodes is not None:
        num_nodes = _check_num_nodes(num_nodes)

    if isinstance(graph, nx.Graph):
        if graph.is_directed():
            raise TopologyError("graph must be undirected (got a directed networkx graph)")
        if graph.number_of_nodes() == 0:
            raise TopologyError("graph has no nodes")
        g = _relabel(nx.Graph(graph))  # nx.Graph() also collapses multi-edges
        g.remove_edges_from(list(nx.selfloop_edges(g)))
        name = str(graph.graph.get("name") or "custom")
    elif isinstance(graph, (str, os.PathLike)) and _looks_like_path(graph):
        g = load_edge_list(graph)
        name = os.fspath(graph)
    elif isinstance(graph, str):
        if graph not in GRAPHS:
            raise TopologyError(f"unknown graph {graph!r}; expected one of {', '.join(GRAPHS)} or an edge-list file")
        if num_nodes is None:
            raise TopologyError(f"num_nodes (--nodes) is required for graph {graph}")
        g = build_graph(graph, num_nodes, seed=seed, er_p=er_p)
        name = graph
    else:
        raise TopologyError(f"graph must be a name, an edge-list path or a networkx graph, got {type(graph).__name__}")

    n = g.number_of_nodes()
    if num_nodes is not None and n != num_nodes:
        raise TopologyError(f"graph {name!r} has {n} nodes but num_nodes={num_nodes} was requested")
    if not nx.is_connected(g):
        k = nx.number_connected_components(g)
        raise TopologyError(
            f"graph {name!r} with {n} nodes is disconnected ({k} components); "
            "a disconnected graph can never reach consensus"
        )

    if matrix is not None:
        w = _load_matrix(matrix)
        check_mixing_matrix(w, n, g)
        return Topology(name=name, graph=g, weights="custom", W=np.array(w, dtype=np.float64))

    if name == "one_peer_exponential":
        sched = _one_peer_schedule(n)
        for w in sched:
            # Each W_t is a single (possibly disconnected) matching; only the union must be connected.
            check_mixing_matrix(w, n, g, symmetric=False, connected=False)
        return Topology(name=name, graph=g, weights="one_peer", W=sched[0], schedule=sched)

    w = mixing_matrix(g, weights)
    check_mixing_matrix(w, n, g, symmetric=True)
    return Topology(name=name, graph=g, weights=weights, W=w)


# --------------------------------------------------------------------------- CLI


def graph_command(
    graph: str,
    num_nodes: int | None,
    *,
    weights: str = "metropolis",
    seed: int = 0,
    er_p: float | None = None,
    as_json: bool = False,
    out: TextIO | None = None,
) -> int:
    """``distdpo graph NAME --nodes N``: print a topology summary; 0 on success, 2 on error."""
    out = sys.stdout if out is None else out  # resolved late so redirected stdout is honoured
    try:
        if num_nodes is None and graph in GRAPHS and not os.path.isfile(graph):
            raise TopologyError(f"--nodes is required for graph {graph}")
        info = make_topology(graph, num_nodes, weights=weights, seed=seed, er_p=er_p).describe()
    except TopologyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps(info, indent=2), file=out)
    else:
        width = max(map(len, info))
        for k, v in info.items():
            val = f"{v:.6g}" if isinstance(v, float) else str(v)
            print(f"{k:<{width}}  {val}", file=out)
    return 0
