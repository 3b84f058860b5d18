"""Secure aggregation: a round's updates summed with Flower's SecAgg+ protocol, so the server sees only their sum.

Flower 1.42 ships SecAgg+ as ``flwr.server.workflow.SecAggPlusWorkflow`` (server) and
``flwr.client.mod.secaggplus_mod`` (client), both on the legacy fit path: the workflow asks a legacy
strategy for ``FitIns`` and hands ``aggregate_fit`` the unmasked weighted average. Here the legacy
strategy is a thin adapter around the round's train messages (what the message-API strategy
configured), and each client masks its update Δ_i = θ_i,K − θ (weighted by its ``num-examples``),
which stays far inside SecAgg+'s clipping range where models might not. The server then hands the
strategy θ + Σ w_i Δ_i as a single reply, so FedAvg, FedProx, the server optimizers and client-side
DP noise apply as without SecAgg+.

Each client quantizes w_i Δ_i / max_weight to ``QUANTIZATION`` levels over [−CLIP, CLIP] with
stochastic rounding: the average is off by less than S · 2·CLIP/QUANTIZATION / Σ_i (w_i/max_weight)
per coordinate (and the weights by 1/QUANTIZATION relative).
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from distdpo.engines.flower import common as wire

CLIP = 8.0  # SecAgg+'s clipping range (Flower's default): |w_i Δ_i / max_weight| per coordinate
QUANTIZATION = 2**22  # levels over [−CLIP, CLIP] (Flower's default)
MODULUS = 2**32  # the masks' modulus: S · QUANTIZATION must stay below it


def quantization_error(num_examples: list[float], max_weight: float) -> float:
    """The largest per-coordinate error of SecAgg+'s weighted average of updates (stochastic rounding)."""
    ratios = [w / max_weight for w in num_examples]
    return len(ratios) * (2 * CLIP / QUANTIZATION) / sum(ratios)


class _Proxy:
    """What SecAggPlusWorkflow reads of a legacy ClientProxy."""

    def __init__(self, node_id: int):
        self.node_id = node_id


class _LegacyRound:
    """The legacy strategy SecAggPlusWorkflow drives: the round's train messages as FitIns, the average kept."""

    def __init__(self, messages: list[Message]):
        self.messages = messages
        self.average: np.ndarray | None = None
        self.results: list[FitRes] = []

    def configure_fit(self, server_round, parameters, client_manager):
        out = []
        for m in self.messages:
            params = compat.arrayrecord_to_parameters(m.content["arrays"], keep_input=True)
            out.append((_Proxy(m.metadata.dst_node_id), FitIns(params, dict(m.content["config"]))))
        return out

    def aggregate_fit(self, server_round, results, failures):
        self.results = [res for _, res in results]
        if self.results:  # every FitRes carries the one unmasked average
            self.average = parameters_to_ndarrays(self.results[0].parameters)[0]
        return None, {}


def secure_round(grid, messages: list[Message], server_round: int, threshold: int, max_weight: float, timeout: float):
    """Run SecAgg+ over ``messages``' nodes; returns (Σ w_i Δ_i / Σ w_i or None when it halted, the FitRes
    of the clients whose masked updates were summed)."""
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

    adapter = _LegacyRound(messages)
    context = LegacyContext(Context(0, 0, {}, RecordDict(), {}), strategy=adapter)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: server_round})
    context.state.array_records[MAIN_PARAMS_RECORD] = messages[0].content["arrays"]
    workflow = SecAggPlusWorkflow(
        num_shares=1.0,  # every sampled client holds a share of every other's keys
        reconstruction_threshold=threshold,
        max_weight=max_weight,
        clipping_range=CLIP,
        quantization_range=QUANTIZATION,
        modulus_range=MODULUS,
        timeout=timeout,
    )
    workflow(grid, context)
    return adapter.average, adapter.results


def as_reply(theta: torch.Tensor, average: np.ndarray, node_id: int) -> Message:
    """θ + the securely averaged update as one train reply of weight 1, for the strategy's aggregate_train."""
    model = theta + torch.from_numpy(np.asarray(average)).to(theta.dtype)
    metrics = MetricRecord({wire.NUM_EXAMPLES: 1.0})
    return Message(RecordDict({"arrays": wire.to_record(theta=model), "metrics": metrics}), node_id, "train")


# ---- client side ------------------------------------------------------------------------------


def _masked_train(msg: Message, context: Context, call_next) -> Message:
    """Between secaggplus_mod and the train handler: FitIns in, the update Δ_i as a FitRes out."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    theta = parameters_to_ndarrays(fitins.parameters)[0]
    msg.content = RecordDict(
        {"arrays": wire.to_record(theta=torch.from_numpy(theta)), "config": ConfigRecord(fitins.config)}
    )
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    delta = reply.content["arrays"][wire.THETA].numpy() - theta
    metrics = dict(reply.content["metrics"])
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([delta]), int(metrics[wire.NUM_EXAMPLES]), metrics)
    return Message(compat.fitres_to_recorddict(res, keep_input=False), reply_to=msg)


def secagg_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's secaggplus_mod for the messages of a SecAgg+ round; the rest pass through."""
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    return secaggplus_mod(msg, context, lambda m, c: _masked_train(m, c, call_next))


__all__ = ["as_reply", "quantization_error", "secagg_mod", "secure_round"]
