"""Engine 'flower': distdpo's federated algorithms as a Flower app (``ServerApp`` + ``ClientApp``).

``run`` trains one configuration in Flower's simulation engine (Ray) on this
machine — or, inside a deployed ServerApp (``flwr run``), over the SuperLink's
grid. Components for ``flwr run``: ``distdpo.engines.flower.server_app:app`` and
``distdpo.engines.flower.client_app:app``.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os

from distdpo.engines.flower import common  # noqa: F401  (sets FLWR_TELEMETRY_ENABLED before flwr loads)

_GRID: contextvars.ContextVar = contextvars.ContextVar("distdpo_flower_grid", default=None)


@contextlib.contextmanager
def use_grid(grid):
    """Runs started inside this block train over ``grid`` (a deployed SuperLink) instead of a simulation."""
    token = _GRID.set(grid)
    try:
        yield
    finally:
        _GRID.reset(token)


def backend_config(cfg) -> dict:
    """Ray for a small machine: one CPU per client actor, no GPUs, quiet, no dashboard."""
    cpus = cfg.engine.flower_cpus or os.cpu_count() or 1
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": cpus,
            "num_gpus": 0,
            "include_dashboard": False,
            "logging_level": "ERROR",
            "log_to_driver": False,
        },
    }


def _num_sites(cfg) -> int:
    """Per-site data in Flower's simulation: one SuperNode per site of ``data.site_data`` (none read here)."""
    from distdpo.data.sites import site_files

    return len(site_files(cfg))


def run(cfg, label: str, cache, *, progress: bool = True):
    """Train one configuration with Flower; returns (metric rows, summary entry) like the simulator."""
    from distdpo.engines.flower.server_app import train

    grid = _GRID.get()
    if grid is not None:
        return train(grid, cfg, label, cache, progress=progress)

    import ray
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from distdpo import build
    from distdpo.engines.flower.client_app import app as client_app

    result: dict = {}
    server_app = ServerApp()

    @server_app.main()
    def _main(grid, context) -> None:
        try:
            result["out"] = train(grid, cfg, label, cache, progress=progress)
        except Exception as e:  # Flower would log it and carry on: hand it to the caller (a divergence, a dead client)
            result["error"] = e

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.ERROR)  # Flower logs every message at INFO (and run_simulation's deprecation)
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=_num_sites(cfg) if build.data_stays_at_sites(cfg) else cache.task(cfg).num_clients,
            backend_config=backend_config(cfg),
        )
    finally:
        flwr_logger.setLevel(level)
        if ray.is_initialized():
            ray.shutdown()
    if "error" in result:
        raise result["error"]
    if "out" not in result:
        raise RuntimeError("Flower's simulation ended without a result (see the log above)")
    return result["out"]
