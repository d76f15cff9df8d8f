"""Reading a node's training reply: decode, validate, and never trust it.

:func:`read_reply` turns one reply into a :class:`~fedlora.strategies.api.ClientUpdate`
or a :class:`~fedlora.server.reports.NodeOutcome` saying why it was not used. Nothing one
reply holds can escape: a corrupt array, a wrong shape, NaN, a lying count, a plugin
hook that raises, even ``MemoryError``, drop that reply with the reason and the round
goes on with the others. :func:`screen_for_wrapper` does the same for what Flower's
central-DP wrappers would otherwise meet unprepared.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message

from fedlora.lora.state import AdapterError, AdapterState
from fedlora.server.link_state import NodeLinks
from fedlora.server.peer import error_reason, whole_number
from fedlora.server.reports import NodeOutcome
from fedlora.strategies.api import ClientPlan, ClientUpdate, LoraStrategy
from fedlora.wire import protocol
from fedlora.wire.codec import CompressionError
from fedlora.wire.records import NUMPY_STYPE, from_arrayrecord, wire_bytes


def reply_bytes(msg: Message) -> int:
    """Payload bytes of a reply as it crossed the wire (0 when unreadable)."""
    try:
        return sum(wire_bytes(r) for r in msg.content.array_records.values())
    except Exception:  # counted as nothing; the reply itself is judged elsewhere
        return 0


def read_reply(
    strategy: LoraStrategy,
    links: NodeLinks,
    server_round: int,
    node_id: int,
    plan: ClientPlan | None,
    msg: Message,
    current: AdapterState,
) -> tuple[NodeOutcome, ClientUpdate | None]:
    """One reply as an update, or the outcome that says why not (never raises)."""
    try:
        if plan is None:
            return NodeOutcome(node_id, "dropped", "reply from a node that was not sampled"), None
        content = msg.content
        record = content.metric_records.get(protocol.METRICS)
        if record is not None and record.get(protocol.DECLINED):
            config = content.config_records.get(protocol.CONFIG)
            reason = str(config.get(protocol.REASON, "declined")) if config else "declined"
            return NodeOutcome(node_id, "declined", reason), None
        n = _claimed_examples(content.array_records, record)
        metrics = {k: float(v) for k, v in record.items() if isinstance(v, int | float)}
        started = time.perf_counter()
        wire = from_arrayrecord(content.array_records[protocol.ARRAYS])
        tensors = links.receive(node_id, wire, plan.reply_shapes(current), plan)
        metrics["decode-seconds"] = time.perf_counter() - started
        state = strategy.decode_update(server_round, plan, tensors, current)
        check_against(state, plan.update_layout(current), plan.rank)
        state.check_finite()
        update = ClientUpdate(node_id, n, state, metrics, plan)
        veto = strategy.accept_update(server_round, update)
        if veto is not None:
            raise AdapterError(veto)
    except (AdapterError, CompressionError, ValueError, KeyError, TypeError) as err:
        return NodeOutcome(node_id, "dropped", str(err)), None
    except MemoryError:  # what the reply declares does not fit: it is not aggregated
        return NodeOutcome(node_id, "dropped", "reply does not fit in memory"), None
    except Exception as err:  # nothing one reply holds may end the round
        reason = f"unreadable reply ({type(err).__name__}: {err})"
        return NodeOutcome(node_id, "dropped", reason), None
    return NodeOutcome(node_id, "ok", "", n, metrics=metrics), update


def _claimed_examples(arrays: Mapping[str, Any], record: Mapping[str, Any] | None) -> int:
    """The examples a training reply claims: a whole number, at least 1 (or AdapterError)."""
    if protocol.ARRAYS not in arrays:
        raise AdapterError(f"reply has no '{protocol.ARRAYS}' ArrayRecord")
    if record is None:
        raise AdapterError(f"reply has no '{protocol.METRICS}' MetricRecord")
    if protocol.NUM_EXAMPLES not in record:
        raise AdapterError(f"reply metrics lack '{protocol.NUM_EXAMPLES}'")
    n = whole_number(record, protocol.NUM_EXAMPLES, 0)
    if n is None or n < 1:
        raise AdapterError(
            f"'{protocol.NUM_EXAMPLES}' is {record[protocol.NUM_EXAMPLES]!r}: a reply must "
            "claim a whole number of examples, at least 1"
        )
    return n


def check_against(state: AdapterState, reference: AdapterState, rank: int | None) -> None:
    """Same modules and dense keys as ``reference``, compatible shapes, rank as asked."""
    if set(state.factors) != set(reference.factors):
        missing = sorted(set(reference.factors) - set(state.factors))
        extra = sorted(set(state.factors) - set(reference.factors))
        raise AdapterError(f"LoRA modules differ: missing {missing[:2]}, unexpected {extra[:2]}")
    if set(state.dense) != set(reference.dense):
        raise AdapterError(
            f"dense tensors differ: expected {sorted(reference.dense)[:3]}, got "
            f"{sorted(state.dense)[:3]}"
        )
    for module, ref in reference.factors.items():
        got = state.factors[module]
        if rank is not None and got.rank != rank:
            raise AdapterError(
                f"module '{module}' has rank {got.rank}, the node was asked for {rank}"
            )
        if got.a.shape[1] != ref.a.shape[1] or got.b.shape[0] != ref.b.shape[0]:
            raise AdapterError(
                f"module '{module}': lora_A {got.a.shape} / lora_B {got.b.shape} do not fit "
                f"the model ({ref.b.shape[0]} x {ref.a.shape[1]})"
            )
    for key, ref_value in reference.dense.items():
        if state.dense[key].shape != ref_value.shape:
            raise AdapterError(
                f"tensor '{key}' has shape {state.dense[key].shape}, expected {ref_value.shape}"
            )


# --------------------------------------------------------------------------- #
# What Flower's central-DP wrappers need to be true of a reply                  #
# --------------------------------------------------------------------------- #
def layout(record: ArrayRecord) -> list[tuple[str, tuple[int, ...]]]:
    """Keys and shapes of a record, in order (what Flower's wrappers pair by position)."""
    return [(key, tuple(int(d) for d in array.shape)) for key, array in record.items()]


def first_difference(
    got: Sequence[tuple[str, tuple[int, ...]]], expected: Sequence[tuple[str, tuple[int, ...]]]
) -> str:
    """Where two layouts part, in words."""
    for i, (g, e) in enumerate(zip(got, expected, strict=False)):
        if g != e:
            return f"tensor {i} is '{g[0]}' {list(g[1])}, expected '{e[0]}' {list(e[1])}"
    return f"{len(got)} tensors, expected {len(expected)}"


def screen_for_wrapper(
    msg: Message,
    plan: ClientPlan | None,
    sent_layout: Sequence[tuple[str, tuple[int, ...]]],
    global_record: ArrayRecord,
    *,
    rank: int,
    whole: bool,
) -> tuple[str, str]:
    """(status, reason) if Flower's DP wrapper must not see this reply; ("", "") keeps it.

    The wrappers skip the round when any node failed, and the server-side one clips each
    reply's arrays against the global record position by position, failing deep in numpy
    (or dividing by zero) on anything unexpected. ``whole``: the reply must carry every
    tensor of the global adapter in Flower's numpy form, with a non-zero update; else it
    must match what the node was sent.
    """
    if msg.has_error():
        return "error", error_reason(msg)
    if plan is not None and plan.rank != rank:
        return "dropped", f"rank {plan.rank}: every node must train at lora-rank={rank}"
    records = msg.content.array_records
    if not records:  # a decline, or a reply without tensors: validated as usual
        return "", ""
    if set(records) != {protocol.ARRAYS}:
        return "dropped", f"array records {sorted(records)}, expected only '{protocol.ARRAYS}'"
    expected = layout(global_record) if whole else list(sent_layout)
    against = "global adapter" if whole else "tensors sent"
    got = layout(records[protocol.ARRAYS])
    if got != expected:
        difference = first_difference(got, expected)
        return "dropped", f"{difference} (the wrapper pairs them with the {against} by position)"
    if not whole:
        return "", ""
    odd = [k for k, a in records[protocol.ARRAYS].items() if a.stype != NUMPY_STYPE]
    if odd:  # Flower's clipping calls Array.numpy(), which reads nothing else
        return "dropped", f"tensor '{odd[0]}' is not in Flower's numpy form"
    try:
        tensors = list(from_arrayrecord(records[protocol.ARRAYS]).values())
        reference = list(from_arrayrecord(global_record).values())
        if [t.shape for t in tensors] != [r.shape for r in reference]:
            raise ValueError("the data do not have the declared shapes")
        if not all(np.issubdtype(t.dtype, np.floating) for t in tensors):
            raise ValueError("a tensor is not floating point")
        norm_sq = sum(
            float(np.sum(np.square(t - r))) for t, r in zip(tensors, reference, strict=True)
        )
    except (AdapterError, TypeError, ValueError) as err:
        return "dropped", f"tensors unreadable for server-side clipping: {err}"
    if norm_sq == 0.0:
        return "dropped", "update is exactly zero (Flower's clipping divides by its norm)"
    return "", ""
