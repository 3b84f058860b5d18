"""Topologies and mixing matrices checked against closed forms and independent computations."""

from __future__ import annotations

import json
import math

import networkx as nx
import numpy as np
import pytest
import scipy.linalg

from distdpo.topology import (
    GRAPHS,
    WEIGHTS,
    TopologyError,
    build_graph,
    check_mixing_matrix,
    graph_command,
    load_edge_list,
    make_topology,
    mixing_matrix,
    spectral_info,
)

# Node counts valid for each graph (torus/grid need composites, hypercube powers of 2).
SIZES = {
    "path": [1, 2, 5, 16],
    "ring": [3, 7, 16],
    "star": [1, 2, 9],
    "complete": [1, 3, 10],
    "torus": [4, 6, 9, 16, 20],
    "grid": [4, 6, 12, 16],
    "hypercube": [1, 2, 8, 32],
    "exponential": [2, 5, 16, 17],
    "erdos_renyi": [10, 30],
    "one_peer_exponential": [1, 2, 5, 8, 12],
}


def _assert_valid_static(W: np.ndarray, graph: nx.Graph) -> None:
    n = graph.number_of_nodes()
    assert W.shape == (n, n) and W.dtype == np.float64
    np.testing.assert_allclose(W, W.T, atol=1e-12)
    assert (W >= -1e-15).all()
    np.testing.assert_allclose(W.sum(axis=0), 1.0, atol=1e-12)
    np.testing.assert_allclose(W.sum(axis=1), 1.0, atol=1e-12)
    allowed = nx.to_numpy_array(graph, nodelist=range(n)) > 0
    allowed |= np.eye(n, dtype=bool)
    assert not (W[~allowed] != 0).any()


# --------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("n", [*range(3, 13), 50])
def test_ring_metropolis_gap(n):
    info = make_topology("ring", n).describe()
    assert info["spectral_gap"] == pytest.approx((2 / 3) * (1 - math.cos(2 * math.pi / n)), abs=1e-10)


@pytest.mark.parametrize("n", [2, 4, 8, 16, 64])
def test_hypercube_gap(n):
    info = make_topology("hypercube", n).describe()
    assert info["spectral_gap"] == pytest.approx(2 / (1 + math.log2(n)), abs=1e-10)
    assert info["min_degree"] == info["max_degree"] == int(math.log2(n))


@pytest.mark.parametrize("n", [2, 5, 12])
def test_complete_is_exact_averaging(n):
    top = make_topology("complete", n)
    np.testing.assert_allclose(top.W, np.full((n, n), 1 / n), atol=1e-14)
    assert top.describe()["spectral_gap"] == pytest.approx(1.0, abs=1e-12)
    assert top.messages_per_round(0) == n * (n - 1)


def test_grid_shapes_and_labels():
    g = build_graph("torus", 12)  # 3 x 4 torus: 4-regular
    assert sorted(g.nodes) == list(range(12)) and {d for _, d in g.degree} == {4}
    g = build_graph("grid", 12)  # 3 x 4 grid: 2*3*4 - 3 - 4 edges
    assert sorted(g.nodes) == list(range(12)) and g.number_of_edges() == 17
    g = build_graph("torus", 4)  # 2 x 2 torus collapses to a 4-cycle, no multi-edges
    assert g.number_of_edges() == 4 and not any(u == v for u, v in g.edges)


def test_exponential_edges():
    g = build_graph("exponential", 10)
    expected = {frozenset((i, (i + 2**k) % 10)) for i in range(10) for k in range(4)}  # floor(log2 9) = 3
    assert {frozenset(e) for e in g.edges} == expected


# --------------------------------------------------------------------------- properties


@pytest.mark.parametrize("name", [g for g in GRAPHS if g != "one_peer_exponential"])
@pytest.mark.parametrize("weights", WEIGHTS)
def test_every_built_W_is_valid(name, weights):
    for n in SIZES[name]:
        top = make_topology(name, n, weights=weights, seed=1)
        assert top.num_nodes == n and not top.time_varying
        _assert_valid_static(top.W, top.graph)
        ev = np.linalg.eigvalsh(top.W)
        assert ev[-1] == pytest.approx(1.0, abs=1e-10)
        if weights.startswith("lazy_"):
            assert ev.min() >= -1e-12
        d = top.describe()
        json.dumps(d)  # plain python types only
        assert d["connected"] and 0 < d["spectral_gap"] <= 1 + 1e-12


def test_metropolis_entries():
    g = build_graph("star", 4)  # centre degree 3, leaves degree 1
    W = mixing_matrix(g, "metropolis")
    assert W[0, 1] == pytest.approx(1 / 4) and W[1, 1] == pytest.approx(3 / 4) and W[0, 0] == pytest.approx(1 / 4)
    W = mixing_matrix(build_graph("path", 3), "max_degree")  # d_max = 2
    np.testing.assert_allclose(W, [[2 / 3, 1 / 3, 0], [1 / 3, 1 / 3, 1 / 3], [0, 1 / 3, 2 / 3]])
    Wl = mixing_matrix(build_graph("path", 3), "lazy_max_degree")
    np.testing.assert_allclose(Wl, 0.5 * (np.eye(3) + W))


def test_spectral_info_matches_scipy():
    rng = np.random.default_rng(0)
    for trial in range(5):
        n = int(rng.integers(5, 40))
        g = nx.connected_watts_strogatz_graph(n, 4, 0.3, seed=trial)
        for weights in WEIGHTS:
            W = mixing_matrix(g, weights)
            ev = scipy.linalg.eigh(W, eigvals_only=True)
            info = spectral_info(W)
            assert info["lambda2"] == pytest.approx(ev[-2], abs=1e-10)
            assert info["lambda_n"] == pytest.approx(ev[0], abs=1e-10)
            lam = max(abs(ev[-2]), abs(ev[0]))
            assert info["lambda"] == pytest.approx(lam, abs=1e-10)
            assert info["spectral_gap"] == pytest.approx(1 - lam, abs=1e-10)


def test_spectral_info_single_node():
    assert spectral_info(np.ones((1, 1))) == {"lambda2": 0.0, "lambda_n": 0.0, "lambda": 0.0, "spectral_gap": 1.0}


@pytest.mark.parametrize("n", [16, 64])
def test_gap_ordering(n):
    gap = {name: make_topology(name, n).describe()["spectral_gap"] for name in ("complete", "torus", "ring", "path")}
    assert gap["complete"] > gap["torus"] > gap["ring"] > gap["path"]


def test_neighbors_and_messages():
    top = make_topology("ring", 5)
    assert top.neighbors(0) == [[1, 4], [0, 2], [1, 3], [2, 4], [0, 3]]
    assert top.messages_per_round(0) == 10 == 2 * top.num_edges
    assert top.matrix(7) is top.W


# --------------------------------------------------------------------------- one-peer exponential


@pytest.mark.parametrize("n", [3, 5, 8, 12, 16])
def test_one_peer_schedule(n):
    top = make_topology("one_peer_exponential", n)
    tau = math.ceil(math.log2(n))
    assert top.time_varying and len(top.schedule) == tau
    M = np.eye(n)
    for t in range(tau):
        W = top.matrix(t)
        check_mixing_matrix(W, n, top.graph, symmetric=False, connected=False)
        peer = [(i + 2**t) % n for i in range(n)]
        assert top.neighbors(t) == [sorted({peer[i], peer.index(i)}) for i in range(n)]
        assert top.messages_per_round(t) == n  # one message out per node
        M = W @ M
    assert top.matrix(tau) is top.matrix(0)
    if n & (n - 1) == 0:
        np.testing.assert_allclose(M, np.full((n, n), 1 / n), atol=1e-14)
        d = top.describe()
        assert d["spectral_gap"] == 1.0 and d["lambda"] == 0.0
    else:
        sigma2 = np.linalg.svd(M, compute_uv=False)[1]
        assert top.describe()["lambda"] == pytest.approx(sigma2 ** (1 / tau))


def test_one_peer_union_graph_is_exponential():
    for n in (5, 8, 13):
        a, b = build_graph("one_peer_exponential", n), build_graph("exponential", n)
        assert {frozenset(e) for e in a.edges} == {frozenset(e) for e in b.edges}


# --------------------------------------------------------------------------- inputs


def test_edge_list_round_trip(tmp_path):
    g = build_graph("torus", 9)
    f = tmp_path / "torus.edges"
    dupes = [f"{v} {u}" for u, v in list(g.edges)[:3]]  # duplicate edges are merged
    lines = ["# a 3x3 torus", ""] + [f"{u} {v}  # edge" for u, v in g.edges] + dupes
    f.write_text("\n".join(lines) + "\n")
    h = load_edge_list(f)
    assert list(h.nodes) == list(range(9))
    assert {frozenset(e) for e in h.edges} == {frozenset(e) for e in g.edges}
    top = make_topology(str(f))
    np.testing.assert_allclose(top.W, make_topology("torus", 9).W)
    with pytest.raises(TopologyError, match="has 9 nodes but num_nodes=10"):
        make_topology(f, 10)


def test_networkx_input_relabels():
    g = nx.relabel_nodes(nx.cycle_graph(6), {i: f"n{i}" for i in range(6)})
    top = make_topology(g)
    assert sorted(top.graph.nodes) == list(range(6)) and top.num_edges == 6
    assert top.describe()["spectral_gap"] == pytest.approx((2 / 3) * (1 - math.cos(2 * math.pi / 6)))


def test_user_matrix(tmp_path):
    n = 4
    W = np.full((n, n), 1 / n)
    top = make_topology("complete", n, matrix=W)
    assert top.weights == "custom" and top.describe()["spectral_gap"] == pytest.approx(1.0)
    np.save(tmp_path / "w.npy", W)
    np.savetxt(tmp_path / "w.csv", W, delimiter=",")
    for p in (tmp_path / "w.npy", str(tmp_path / "w.csv")):
        np.testing.assert_allclose(make_topology("complete", n, matrix=p).W, W)


# --------------------------------------------------------------------------- errors


def test_disconnected_graph():
    g = nx.disjoint_union(nx.path_graph(3), nx.path_graph(2))
    with pytest.raises(TopologyError, match=r"disconnected \(2 components\)"):
        make_topology(g)


@pytest.mark.parametrize(
    ("W", "match"),
    [
        (np.full((3, 3), 0.3), r"not doubly stochastic: row \d sums to 0.9"),
        (np.array([[1.5, -0.5, 0], [-0.5, 1.5, 0], [0, 0, 1.0]]), r"negative entries, e.g. W\[\d, \d\] = -0.5"),
        (np.array([[0.5, 0.5, 0], [0.25, 0.5, 0.25], [0.25, 0, 0.75]]), r"not symmetric: max \|W - W\^T\| = 0.25"),
        (np.full((4, 4), 0.25), r"wrong size: expected 3x3, got 4x4"),
        (np.full(3, 1 / 3), r"square 2-D matrix"),
        (np.array([[0.5, 0.5, 0], [0.5, np.nan, 0.5], [0, 0.5, 0.5]]), r"NaN/inf"),
    ],
)
def test_bad_user_matrix(W, match):
    with pytest.raises(TopologyError, match=match):
        make_topology("complete", 3, matrix=W)


def test_matrix_weight_on_non_edge():
    W = np.full((3, 3), 1 / 3)  # uses edge (0, 2), absent from the path 0-1-2
    with pytest.raises(TopologyError, match=r"pair \(0, 2\), which is not an edge"):
        make_topology("path", 3, matrix=W)


def test_disconnected_matrix():
    W = np.eye(3)
    with pytest.raises(TopologyError, match=r"disconnected: its support graph has 3 components"):
        check_mixing_matrix(W, 3)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (("moebius", 4), {}, r"unknown graph 'moebius'; expected one of path, ring"),
        (("hypercube", 6), {}, r"power of 2, got 6"),
        (("torus", 7), {}, r"composite"),
        (("ring", 2), {}, r"ring' needs num_nodes >= 3"),
        (("path", 0), {}, r"num_nodes must be >= 1"),
        (("ring", 5), {"weights": "uniform"}, r"unknown weights 'uniform'; expected one of metropolis"),
        (("ring",), {}, r"required for graph ring"),
        (("erdos_renyi", 30), {"er_p": 0.01, "seed": 3}, r"p=0.01, seed=3 is disconnected .*larger p"),
    ],
)
def test_bad_arguments(args, kwargs, match):
    with pytest.raises(TopologyError, match=match):
        make_topology(*args, **kwargs)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("0 1\n1 2\n1 x\n", r"bad\.edges:3: expected two integer node labels 'u v', got '1 x'"),
        ("0 1\n\n1 2 3\n", r"bad\.edges:3: .*got '1 2 3'"),
        ("0 1\n1 1\n", r"bad\.edges:2: self-loop"),
        ("0 1\n1 3\n3 5\n", r"2 label\(s\) are missing: 2, 4"),
        ("0 1\n1 99999999999999\n", r"99999999999997 label\(s\) are missing: 2, 3, 4"),
        ("# nothing\n", r"no edges"),
    ],
)
def test_bad_edge_list(tmp_path, text, match):
    f = tmp_path / "bad.edges"
    f.write_text(text)
    with pytest.raises(TopologyError, match=match):
        load_edge_list(f)


# --------------------------------------------------------------------------- CLI


def test_graph_command_json(capsys):
    assert graph_command("torus", 16, as_json=True) == 0
    info = json.loads(capsys.readouterr().out)
    for key in ("num_nodes", "num_edges", "connected", "lambda2", "spectral_gap", "weights", "graph"):
        assert key in info
    assert info["num_nodes"] == 16 and info["num_edges"] == 32 and info["connected"] is True
    assert info["spectral_gap"] == pytest.approx(0.4)


def test_graph_command_table(capsys):
    assert graph_command("ring", 8, weights="lazy_metropolis") == 0
    out = capsys.readouterr().out
    assert "spectral_gap" in out and "lazy_metropolis" in out


def test_graph_command_errors(tmp_path, capsys):
    f = tmp_path / "split.txt"
    f.write_text("0 1\n2 3\n")
    assert graph_command(str(f), None) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "disconnected (2 components)" in err and "Traceback" not in err
    assert graph_command("ring", None) == 2
    assert "--nodes is required for graph ring" in capsys.readouterr().err
