"""distdpo: Direct Preference Optimization over many heterogeneous users, federated and decentralized."""

__version__ = "0.1.0"
