"""Workloads: data + policy + DPO loss, exposed as stacked losses and gradients."""

from distdpo.tasks.base import Batch, Task

__all__ = ["Batch", "Task"]
