"""Federated evaluation: nodes evaluate the global adapter on their own held-out data.

Asked of ``fraction-evaluate`` of the nodes each round; the server takes the
example-weighted mean of what they report, ignoring any reply whose numbers are not
numbers (a count that is a list or NaN, an accuracy that is not finite).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from logging import WARNING

from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedlora.lora.plan import ClientPlan
from fedlora.lora.state import AdapterState
from fedlora.server.peer import error_reason, finite_number, whole_number
from fedlora.server.weights import Claim, WeightPolicy, client_weights
from fedlora.strategies.api import logger
from fedlora.wire import protocol
from fedlora.wire.records import to_arrayrecord


def evaluation_messages(
    server_round: int,
    current: AdapterState,
    config: ConfigRecord,
    nodes: Sequence[int],
    plan_for: Callable[[int], ClientPlan] | None = None,
) -> list[Message]:
    """One EVALUATE message per node: its evaluation plan and the global adapter.

    ``plan_for(node)``: the strategy's ``evaluation_plan`` (default: evaluate the adapter
    as received). A tensor the plan does not read (a ``local_b`` node's lora_B) is not sent.
    """
    messages, records = [], {}  # one record per distinct plan (usually one in all)
    tensors = current.to_state_dict()
    for node in nodes:
        plan = plan_for(node) if plan_for is not None else ClientPlan(rank=current.rank)
        text = plan.to_json()
        if text not in records:
            eval_config = ConfigRecord(dict(config))
            eval_config[protocol.SERVER_ROUND] = server_round
            eval_config[protocol.PLAN] = text
            arrays = to_arrayrecord({k: v for k, v in tensors.items() if plan.reads(k)})
            records[text] = RecordDict({protocol.ARRAYS: arrays, protocol.CONFIG: eval_config})
        messages.append(Message(records[text], dst_node_id=node, message_type=MessageType.EVALUATE))
    return messages


def mean_evaluation(
    replies: Iterable[Message], policy: WeightPolicy | None = None
) -> MetricRecord | None:
    """The weighted mean of the nodes' evaluation loss and accuracy (None: no usable reply).

    Each node's weight comes from its claimed example count, bounded as training claims
    are (``policy``: the ratio and share caps), so one node claiming 2^53 examples cannot
    set the federated numbers; a loss that is not a finite non-negative number, or an
    accuracy outside [0, 1], drops that value.
    """
    values: list[tuple[int, int, dict[str, float]]] = []  # node, claimed examples, values
    for msg in replies:
        node = msg.metadata.src_node_id
        m = None if msg.has_error() else msg.content.metric_records.get(protocol.METRICS)
        n = None if m is None else whole_number(m, protocol.NUM_EXAMPLES, 0)
        if m is None or n is None or n <= 0:
            reason = error_reason(msg) if msg.has_error() else "no metrics, or a bad count"
            logger.log(WARNING, "Evaluation reply from node %s ignored: %s", node, reason)
            continue
        loss, accuracy = (
            finite_number(m, protocol.EVAL_LOSS),
            finite_number(m, protocol.EVAL_ACCURACY),
        )
        kept = {}
        if loss is not None and loss >= 0:
            kept[protocol.EVAL_LOSS] = loss
        if accuracy is not None and 0.0 <= accuracy <= 1.0:
            kept[protocol.EVAL_ACCURACY] = accuracy
        values.append((node, n, kept))
    if not values:
        return None
    claims = [Claim(node, n) for node, n, _ in values]
    weights, _ = client_weights(claims, policy or WeightPolicy())
    if weights is None:
        return None
    means: dict[str, float] = {}
    for key in (protocol.EVAL_LOSS, protocol.EVAL_ACCURACY):
        pairs = [(w, v[key]) for w, (_, _, v) in zip(weights, values, strict=True) if key in v]
        total = sum(w for w, _ in pairs)
        if total > 0:
            means[key] = sum(w * x for w, x in pairs) / total
    return MetricRecord(means | {"num-examples": sum(n for _, n, _ in values)})
