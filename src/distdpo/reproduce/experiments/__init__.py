"""The suite's experiments, in report order. Each module names its experiment (``NAME``), builds its runs from a
:class:`~distdpo.reproduce.runs.Plan` (``runs``) and analyses them (``analyse``: results → findings)."""

import importlib

_REPORT_ORDER = (
    "theory_instance",
    "a_comparative",
    "b1_local_steps",
    "b2_participation",
    "b3_topology",
    "b4_staleness",
    "b5_heterogeneity",
    "b6_communication",
    "personalization",
)
EXPERIMENTS = tuple(importlib.import_module(f"{__name__}.{name}") for name in _REPORT_ORDER)

__all__ = ["EXPERIMENTS"]
