"""distdpo: Direct Preference Optimization over many heterogeneous users, federated and decentralized."""

import os

__version__ = "0.1.0"

# OpenMP threads that spin while waiting stall 20–60× when another process shares the cores (a second run,
# torchrun ranks, Ray workers); passive waiting costs little. Only effective if set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
