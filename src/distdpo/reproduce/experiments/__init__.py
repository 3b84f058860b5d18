"""The suite's experiments, in report order. Each module names its experiment (``NAME``), builds its runs from a
:class:`~distdpo.reproduce.runs.Plan` (``runs``) and analyses them (``analyse``: results → findings)."""

from distdpo.reproduce.experiments import (
    a_comparative,
    b1_local_steps,
    b2_participation,
    b3_topology,
    b4_staleness,
    b5_heterogeneity,
    theory_instance,
)

EXPERIMENTS = (
    theory_instance,
    a_comparative,
    b1_local_steps,
    b2_participation,
    b3_topology,
    b4_staleness,
    b5_heterogeneity,
)

__all__ = ["EXPERIMENTS"]
