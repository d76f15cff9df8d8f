"""The size limit of one Flower message, checked before a message is sent.

Flower chunks arrays on the wire, but one message may not exceed gRPC's 2 GiB. A
message over the limit fails deep in the transport with a bare status code, after the
payload was built; checked here, it fails before sending with the tensor sizes and the
ways out.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

MIB = 1 << 20
LIMIT_BYTES: int = 2_147_483_647
"""Flower's transport limit for one message (``flwr.common.GRPC_MAX_MESSAGE_LENGTH``, 2 GiB
- 1), written out so that the config needs no Flower import; a test keeps them equal."""


class MessageTooLargeError(ValueError):
    """A message would exceed the transport limit; the text names its largest tensors."""


def check_message_size(
    nbytes: int, tensors: Mapping[str, np.ndarray], limit: int, what: str
) -> None:
    """Raise :class:`MessageTooLargeError` when ``nbytes`` exceeds ``limit``.

    ``tensors`` are what the message carries (wire form), for the error text; ``what``
    names the message ("training payload for node 7").
    """
    if nbytes <= limit:
        return
    sizes = sorted(
        ((np.asarray(v).nbytes, k, np.shape(v)) for k, v in tensors.items()), reverse=True
    )
    largest = ", ".join(f"{k} {list(s)} {b / MIB:.1f} MiB" for b, k, s in sizes[:5])
    raise MessageTooLargeError(
        f"The {what} is {nbytes / MIB:.1f} MiB, over the message limit of {limit / MIB:.1f} MiB "
        f"({len(tensors)} tensors; largest: {largest}). Send less: compress "
        "(uplink-density / downlink-density, uplink-values / downlink-values = int8 or sign), "
        "lower lora-rank or target fewer modules (lora-targets)."
    )
