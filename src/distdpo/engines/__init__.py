"""Engines supply communication to the algorithms: the in-process simulator (default), torchdist, flower.

An engine is a function ``run(cfg, label, cache, progress=True) -> (rows, summary)``
that trains one configuration and returns its metric rows (see
:mod:`distdpo.metrics`) and its summary entry.
"""

from __future__ import annotations

import importlib

ENGINES = {
    "simulation": "distdpo.engines.simulation",
    "flower": "distdpo.engines.flower",
    "torchdist": "distdpo.engines.torchdist",
}


def runner(name: str):
    """The ``run`` function of engine ``name`` (imported lazily: optional engines need optional packages)."""
    try:
        module = ENGINES[name]
    except KeyError:
        raise ValueError(f"unknown engine {name!r}; expected one of {', '.join(ENGINES)}") from None
    return importlib.import_module(module).run
