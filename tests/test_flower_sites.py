"""Engine 'flower' with per-site data (data.source = "local"): each SuperNode reads its own site's files, the server
none; the global model is measured at the sites (Flower evaluate messages) with the simulator's numbers."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("flwr", reason="flwr is not installed (pip install -e '.[flower]')")

from test_flower import _assert_same  # noqa: E402
from test_flower_deploy import Deployment  # noqa: E402
from test_sites import LM, LOCAL, sites  # noqa: E402, F401  (the fixture: three PandaLM sites and a model)

from distdpo.config import load  # noqa: E402
from distdpo.experiment import Cache, run_one  # noqa: E402


def _config(tmp_path, root, algorithm="fedavg", site_data=True):
    path = tmp_path / "job.toml"
    data = LOCAL.format(sites=root / "split") if site_data else '[data]\nsource = "local"\nloss_pairs_per_client = 2\n'
    path.write_text(data + LM.format(model=root / "model", algorithm=algorithm))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["fedavg", "scaffold"])
def test_flower_simulation_of_sites_matches_the_simulator(sites, algorithm, tmp_path):  # noqa: F811
    """partition-id form: Flower's simulated SuperNode i reads site i of data.site_data, and nothing else."""
    job = _config(tmp_path, sites, algorithm)
    sim_rows, _ = run_one(load(job), "run", Cache(), progress=False)
    flower = load(job, ['engine.name="flower"', "engine.flower_cpus=2"])
    fl_rows, summary = run_one(flower, "run", Cache(), progress=False)
    _assert_same(sim_rows, fl_rows, rel=1e-4)
    files = summary["flower"]["files_read"]
    assert len(files) == 3 and all(all(f"/{name}/" in path for path in paths) for name, paths in files.items())


@pytest.mark.slow
def test_three_supernodes_each_with_only_its_own_site(sites, tmp_path):  # noqa: F811
    """Each SuperNode gets its site's files (copied into its own directory) by its node config; the server's run
    config names no data file. The run equals the simulator reading the same files."""
    manifest = json.loads((sites / "split" / "manifest.json").read_text())
    node_config = {}
    for i, client in enumerate(manifest["clients"]):
        own = tmp_path / f"site{i}"
        shutil.copytree(sites / "split" / client["dir"], own)
        files = f'data-path="{own / "train.jsonl"}" eval-path="{own / "eval.jsonl"}"'
        node_config[i] = f'{files} client-name="{client["name"]}"'
    job, out = _config(tmp_path, sites, site_data=False), tmp_path / "run"
    # Only the final row is compared: no evaluation at round 1 (each costs a ClientApp process per site).
    job.write_text(job.read_text() + 'name = "flower"\nflower_timeout = 300.0\neval_every = 2\n')
    assert "split" not in job.read_text()
    with Deployment(tmp_path) as d:
        summary = d.start(node_config=node_config).run(job, out, timeout=600)
    run = summary["runs"]["run"]
    assert {name: paths for name, paths in run["flower"]["files_read"].items()} == {
        client["name"]: [str(tmp_path / f"site{i}" / f) for f in ("train.jsonl", "eval.jsonl")]
        for i, client in enumerate(manifest["clients"])
    }
    (tmp_path / "sim").mkdir()
    sim_rows, _ = run_one(load(_config(tmp_path / "sim", sites)), "run", Cache(), progress=False)
    # Flower's numpy float32 average and the simulator's matmul round differently: over 3 rounds the loss moves by
    # ~1e-5 relative. ‖∇f‖² moves through the curvature (δ‖g‖² = 2gᵀH δθ), several times more: a 10× tolerance.
    tolerance = dict.fromkeys(("global_loss", "pref_accuracy", "eval_loss", "reward_margin"), 1e-4)
    for key, rel in {**tolerance, "grad_norm_sq": 1e-3}.items():
        assert run["final"][key] == pytest.approx(sim_rows[-1][key], rel=rel), key
