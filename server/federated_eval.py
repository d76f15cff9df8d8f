"""Federated evaluation: nodes evaluate the global adapter on their own held-out data.

Asked of ``fraction-evaluate`` of the nodes each round; the server takes the
example-weighted mean of what they report, ignoring any reply whose numbers are not
numbers (a count that is a list or NaN, an accuracy that is not finite).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from logging import WARNING

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedlora.lora.plan import ClientPlan
from fedlora.lora.state import AdapterState
from fedlora.server.replies import whole_number
from fedlora.strategies.api import logger
from fedlora.wire import protocol
from fedlora.wire.records import to_arrayrecord


def evaluation_messages(
    server_round: int, current: AdapterState, config: ConfigRecord, nodes: Sequence[int]
) -> list[Message]:
    """One EVALUATE message per node, carrying the global adapter at its own rank."""
    eval_config = ConfigRecord(dict(config))
    eval_config[protocol.SERVER_ROUND] = server_round
    eval_config[protocol.PLAN] = ClientPlan(rank=current.rank).to_json()
    record = RecordDict(
        {protocol.ARRAYS: to_arrayrecord(current.to_state_dict()), protocol.CONFIG: eval_config}
    )
    return [Message(record, dst_node_id=n, message_type=MessageType.EVALUATE) for n in nodes]


def mean_evaluation(replies: Iterable[Message]) -> MetricRecord | None:
    """Example-weighted mean of the nodes' evaluation loss and accuracy (None: no replies)."""
    totals: dict[str, float] = {}
    counts: dict[str, int] = {}
    count = 0
    for msg in replies:
        m = None if msg.has_error() else msg.content.metric_records.get(protocol.METRICS)
        n = None if m is None else whole_number(m, protocol.NUM_EXAMPLES, 0)
        if m is None or n is None:
            reason = msg.error.reason if msg.has_error() else "no metrics, or a bad count"
            logger.log(
                WARNING,
                "Evaluation reply from node %s ignored: %s",
                msg.metadata.src_node_id,
                reason,
            )
            continue
        if n <= 0:
            continue
        count += n
        for key in (protocol.EVAL_LOSS, protocol.EVAL_ACCURACY):
            value = m.get(key, float("nan"))
            if isinstance(value, int | float) and np.isfinite(value):
                totals[key] = totals.get(key, 0.0) + n * value
                counts[key] = counts.get(key, 0) + n
    if count == 0:
        return None
    means = {k: v / counts[k] for k, v in totals.items()}
    return MetricRecord(means | {"num-examples": count})
