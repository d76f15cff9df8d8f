"""Flower ClientApp: receive the global adapter, train it locally, reply with the result.

Thin glue over :mod:`fedlora.clients.job`: parse the message, call the local job, wrap the
answer in records. Nothing here keeps state between messages except process caches
(base model, tokenised partition), which are safe to lose.

Importing this module is light (Flower and numpy): torch, transformers, peft and Opacus
are imported by the first message that needs them, so ``flwr-clientapp`` loads the app
in well under a second and a warm worker pays for them once.
"""

from __future__ import annotations

import os
import sys
import time

from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedlora.clients import secure_node
from fedlora.wire import protocol

_MESSAGES = 0
"""Messages this process has handled (a per-message process handles one)."""


def central_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``fixedclipping_mod`` on training messages that ask for it.

    The server's ``DifferentialPrivacyClientSideFixedClipping`` puts the clipping norm in
    the config (central-dp = client); every other message passes straight through, as
    the mod itself would refuse a message without the norm.
    """
    config = msg.content.config_records.get(protocol.CONFIG) if msg.has_content() else None
    if msg.metadata.message_type == MessageType.TRAIN and config and KEY_CLIPPING_NORM in config:
        out = fixedclipping_mod(msg, context, call_next)
        if out.has_error() and out.metadata.reply_to_message_id != msg.metadata.message_id:
            # flwr 1.39's checks of the reply answer the reply itself, so the server never
            # hears of them and waits for the round timeout: answer the instruction instead
            return Message(out.error, reply_to=msg)
        return out
    return call_next(msg, context)


app = ClientApp(mods=[central_clipping_mod])


def _arrived() -> float:
    """Call when a message's imports are done: this process's start cost, 0 after the first.

    The first message pays for the interpreter, Flower and the heavy imports (a fresh
    per-message process pays them every time); a warm worker's later messages pay none.
    """
    global _MESSAGES
    _MESSAGES += 1
    if _MESSAGES > 1:
        return 0.0
    import psutil

    # a warm worker was ready before its first task: the wait for it is no start cost
    ready = float(os.environ.get("FEDLORA_PROCESS_READY", "inf"))
    return min(time.time(), ready) - psutil.Process().create_time()


def _process_metrics(start_cost: float) -> dict[str, float]:
    """The start cost, PID and peak resident memory of the process that ran the message."""
    metrics = {protocol.PROCESS_SECONDS: start_cost, protocol.PROCESS_ID: os.getpid()}
    try:
        import resource  # Unix only
    except ImportError:
        return metrics
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    metrics[protocol.PROCESS_PEAK_MIB] = (
        peak / (1 << 20) if sys.platform == "darwin" else peak / 1024
    )
    return metrics


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Fine-tune the received adapter on this node's data."""
    from fedlora.clients.job import LocalJob
    from fedlora.privacy.dp_sgd import BudgetExhaustedError
    from fedlora.wire.message_size import check_message_size
    from fedlora.wire.records import to_arrayrecord, wire_bytes

    start_cost = _arrived()
    started = time.perf_counter()
    job = LocalJob.from_message(msg, context)
    if job.node.require_secure_aggregation and not secure_node.asked_to_mask(msg):
        from fedlora.config import ConfigError

        raise ConfigError(
            "This node's node-config sets require-secure-aggregation=true: it sends its "
            "update only masked, and the run has secure-aggregation=off"
        )
    try:
        tensors, metrics = job.train()
    except BudgetExhaustedError as err:  # decline, with the reason, rather than overspend
        declined = RecordDict(
            {
                protocol.METRICS: MetricRecord({protocol.DECLINED: 1}),
                protocol.CONFIG: ConfigRecord({protocol.REASON: str(err)}),
            }
        )
        return Message(declined, reply_to=msg)
    if secure_node.asked_to_mask(msg):  # SecAgg+: the server sees only a masked vector
        tensors = {protocol.SECAGG_MASKED: secure_node.mask_reply(msg, context, tensors)}
    record = to_arrayrecord(tensors, flower_numpy=job.cfg.central_dp != "off")
    metrics.update(_process_metrics(start_cost))
    metrics[protocol.HANDLER_SECONDS] = time.perf_counter() - started
    # refused here, the server logs the reason and the round goes on without this node
    check_message_size(
        wire_bytes(record),
        tensors,
        job.cfg.max_message_bytes,
        f"reply for round {job.server_round}",
    )
    content = RecordDict({protocol.ARRAYS: record, protocol.METRICS: MetricRecord(metrics)})
    return Message(content, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Describe this node (its rank and partition) to the server."""
    from fedlora.clients.job import LocalJob

    _arrived()
    job = LocalJob.from_message(msg, context)
    return Message(RecordDict({protocol.METRICS: MetricRecord(job.node_info())}), reply_to=msg)


@app.query(protocol.SECAGG_ACTION)
def secure_aggregation_stage(msg: Message, context: Context) -> Message:
    """A SecAgg+ stage around training: key setup, key sharing or unmasking."""
    _arrived()
    return secure_node.handle_stage(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global adapter on this node's held-out data."""
    from fedlora.clients.job import LocalJob

    _arrived()
    job = LocalJob.from_message(msg, context)
    metrics = job.evaluate()
    content = RecordDict({protocol.METRICS: MetricRecord(metrics)})
    return Message(content, reply_to=msg)
