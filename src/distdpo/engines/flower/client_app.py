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

from distdpo import build, faults
from distdpo.algorithms.base import local_steps
from distdpo.algorithms.optim import ClientOptimizer
from distdpo.engines.flower import common as wire
from distdpo.engines.flower import sites
from distdpo.engines.flower.secure import secagg_mod


def _partition(context: Context, num_clients: int | None) -> int:
    try:
        pid = int(context.node_config[wire.PARTITION])
    except KeyError:
        raise ValueError(
            f"this SuperNode has no '{wire.PARTITION}' in its node config; start it with "
            f'--node-config "{wire.PARTITION}=<i> {wire.NUM_PARTITIONS}=<n>"'
        ) from None
    if not 0 <= pid < (num_clients or pid + 1):
        raise ValueError(
            f"{wire.PARTITION} = {pid} but the distdpo config has {num_clients} clients (0..{num_clients - 1})"
        )
    return pid


def _task(config: ConfigRecord, context: Context):
    """(config, this node's task, its partition-id): every client's task, or with per-site data its site's alone."""
    text = config[wire.CONFIG]
    cfg = wire.config_from_text(text)
    if build.data_stays_at_sites(cfg):
        sizes, names = list(config[sites.SIZES]), list(config[sites.NAMES])
        pid = _partition(context, len(sizes))
        return cfg, sites.site_task(text, cfg, context.node_config, pid, sizes, names), pid
    task = wire.task_for(text)
    return cfg, task, _partition(context, task.num_clients)


def _optional_clipping(msg: Message, context: Context, call_next):
    """Flower's client-side fixed clipping, when the server's DP wrapper asks for it."""
    config = next(iter(msg.content.config_records.values()), {})
    if KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which client this node is and how much data it holds (a site: its counts and name)."""
    text = msg.content["config"][wire.CONFIG]
    cfg = wire.config_from_text(text)
    parts = int(context.node_config.get(wire.NUM_PARTITIONS, -1))
    content = RecordDict()
    if build.data_stays_at_sites(cfg):
        pid = _partition(context, parts if parts > 0 else None)
        content["metrics"], content["config"] = sites.site_info(text, cfg, context.node_config, pid)
        size = int(content["metrics"][sites.TRAIN_PAIRS])
    else:
        task = wire.task_for(text)
        pid = _partition(context, task.num_clients)
        content["metrics"], size = MetricRecord(), int(task.client_sizes[pid])
    content["metrics"].update(
        {wire.PARTITION: pid, wire.NUM_PARTITIONS: parts, wire.NUM_EXAMPLES: wire.num_examples(cfg, size)}
    )
    return Message(content, reply_to=msg)


@app.train(mods=[secagg_mod, _optional_clipping])
def train(msg: Message, context: Context) -> Message:
    """K local steps from the received θ; returns θ_K (Flower's strategies aggregate models)."""
    torch.set_num_threads(1)  # one client per CPU: Ray/SuperNodes run clients side by side
    config: ConfigRecord = msg.content["config"]
    cfg, task, pid = _task(config, context)
    faults.inject(pid, int(config.get("server-round", 0)))  # DISTDPO_FAULT="<kind>:<partition-id>:<round>"
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
        {
            wire.NUM_EXAMPLES: wire.num_examples(cfg, int(task.client_sizes[pid])),
            wire.DRIFT: float(drift[0]),
            wire.PARTITION: pid,
        }
    )
    return Message(RecordDict({"arrays": wire.to_record(theta=X[0]), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Per-site data: measure the received θ on this site's pairs (see :mod:`.sites`)."""
    torch.set_num_threads(1)
    config: ConfigRecord = msg.content["config"]
    cfg, task, _ = _task(config, context)
    theta = wire.from_record(msg.content["arrays"], wire.THETA, build.torch_dtype(cfg), task.device)
    return Message(sites.measure(task, theta, str(config[sites.MEASURE])), reply_to=msg)
