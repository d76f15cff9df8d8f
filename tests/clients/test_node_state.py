"""The node store keeps arrays and metadata side by side, in context.state and on disk."""

from __future__ import annotations

import numpy as np
from flwr.app import Context, RecordDict

from fedlora.clients.node_state import NodeStore


def _context():
    return Context(run_id=1, node_id=2, node_config={}, state=RecordDict(), run_config={})


def test_context_only_store_round_trips_through_flower_serialisation():
    from flwr.common import serde

    ctx = _context()
    NodeStore(ctx, None).save("merged-base", {"m.q": np.ones((2, 3), np.float32)}, {"last": 1})
    NodeStore(ctx, None).save("privacy", {}, {"sigma": 1.5})
    back = serde.context_from_proto(serde.context_to_proto(ctx))  # as between messages
    arrays, meta = NodeStore(back, None).load("merged-base")
    np.testing.assert_array_equal(arrays["m.q"], np.ones((2, 3), np.float32))
    assert meta == {"last": 1}
    assert NodeStore(back, None).load("privacy") == ({}, {"sigma": 1.5})


def test_arrays_and_meta_survive_together_and_on_disk(tmp_path):
    ctx = _context()
    store = NodeStore(ctx, str(tmp_path))
    arrays = {"m.q": np.arange(6, dtype=np.float32).reshape(2, 3)}
    store.save("merged-base", arrays, {"last-merged-round": 3, "history": [[1.0, 0.1, 5]]})
    store.save("privacy", {}, {"sigma": 1.2})
    got, meta = store.load("merged-base")
    np.testing.assert_array_equal(got["m.q"], arrays["m.q"])
    assert meta == {"last-merged-round": 3, "history": [[1.0, 0.1, 5]]}
    # a restarted SuperNode has an empty context: the files bring the state back
    again, meta2 = NodeStore(_context(), str(tmp_path)).load("merged-base")
    np.testing.assert_array_equal(again["m.q"], arrays["m.q"])
    assert meta2["last-merged-round"] == 3
    assert NodeStore(_context(), None).load("merged-base") == ({}, {})
