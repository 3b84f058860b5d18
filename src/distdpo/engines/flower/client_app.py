"""The Flower ClientApp: one SuperNode = one distdpo client, selected by its ``partition-id``.

Local training is distdpo's own :func:`~distdpo.algorithms.base.local_steps` on this
client's row, with the minibatch generator the server hands over, so a Flower
client draws exactly the numbers the simulator draws for that client.
"""

from __future__ import annotations

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from distdpo import build
from distdpo.algorithms.base import local_steps
from distdpo.algorithms.optim import ClientOptimizer
from distdpo.engines.flower import common as wire


def _partition(context: Context, task) -> int:
    try:
        pid = int(context.node_config[wire.PARTITION])
    except KeyError:
        raise ValueError(
            f"this SuperNode has no '{wire.PARTITION}' in its node config; start it with "
            f'--node-config "{wire.PARTITION}=<i> {wire.NUM_PARTITIONS}=<n>"'
        ) from None
    if not 0 <= pid < task.num_clients:
        raise ValueError(
            f"{wire.PARTITION} = {pid} but the distdpo config has {task.num_clients} clients "
            f"(0..{task.num_clients - 1})"
        )
    return pid


def _num_examples(cfg, task, pid: int) -> float:
    """Flower's FedAvg weighs replies by this: |D_i| for p_i ∝ |D_i|, 1 for uniform weighting."""
    return float(task.client_sizes[pid]) if build.aggregation(cfg) == "size" else 1.0


def _optional_clipping(msg: Message, context: Context, call_next):
    """Flower's client-side fixed clipping, when the server's DP wrapper asks for it."""
    config = next(iter(msg.content.config_records.values()), {})
    if KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which client this node is and how much data it holds."""
    text = msg.content["config"][wire.CONFIG]
    cfg, task = wire.config_from_text(text), wire.task_for(text)
    pid = _partition(context, task)
    metrics = MetricRecord(
        {
            wire.PARTITION: pid,
            wire.NUM_PARTITIONS: int(context.node_config.get(wire.NUM_PARTITIONS, -1)),
            wire.NUM_EXAMPLES: _num_examples(cfg, task, pid),
        }
    )
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


@app.train(mods=[_optional_clipping])
def train(msg: Message, context: Context) -> Message:
    """K local steps from the received θ; returns θ_K (Flower's strategies aggregate models)."""
    torch.set_num_threads(1)  # one client per CPU: Ray/SuperNodes run clients side by side
    config: ConfigRecord = msg.content["config"]
    text = config[wire.CONFIG]
    cfg, task = wire.config_from_text(text), wire.task_for(text)
    pid = _partition(context, task)
    dtype = build.torch_dtype(cfg)
    arrays = msg.content["arrays"]
    theta = wire.from_record(arrays, wire.THETA, dtype, task.device)
    correction = (
        wire.from_record(arrays, wire.CORRECTION, dtype, task.device)[None] if wire.CORRECTION in arrays else None
    )
    gen = wire.rng_from_bytes(config[wire.RNG_STATE])
    a = cfg.algorithm
    bs = build.batch_size(cfg)
    X, drift, _ = local_steps(
        task,
        theta[None],
        torch.tensor([pid], device=task.device),
        a.local_steps,
        ClientOptimizer(a.optimizer, a.lr, a.weight_decay),
        lambda: task.sample_batch(gen, bs),
        correction=correction,
        prox_mu=float(config.get("proximal-mu", 0.0)),
    )
    metrics = MetricRecord(
        {wire.NUM_EXAMPLES: _num_examples(cfg, task, pid), wire.DRIFT: float(drift[0]), wire.PARTITION: pid}
    )
    return Message(RecordDict({"arrays": wire.to_record(theta=X[0]), "metrics": metrics}), reply_to=msg)
