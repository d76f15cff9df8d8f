"""Stacks merged into the base: both ends agree, against a direct sum of the products."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.lora.base_merge import (
    MERGE_PREFIX,
    NodeBase,
    base_disagreement,
    merge_into_base,
    stack_payload,
    without_stacks,
)
from fedlora.lora.state import AdapterError
from tests.helpers import random_state


def _stacks(rng, rounds=(1, 2, 3)):
    return {r: random_state(rng, rank=2 + r, scaling=1.0 / r) for r in rounds}


def test_merging_equals_the_direct_sum_of_scaled_products():
    rng = np.random.default_rng(0)
    stacks = _stacks(rng)
    delta = {}
    for r in sorted(stacks):
        delta = merge_into_base(delta, stacks[r])
    for module in delta:
        want = sum(
            s.scaling * s.factors[module].b.astype(np.float64) @ s.factors[module].a
            for s in stacks.values()
        )
        np.testing.assert_allclose(delta[module], want, rtol=1e-5, atol=1e-6)


def test_a_node_catches_up_in_order_and_skips_what_it_has():
    rng = np.random.default_rng(1)
    stacks = _stacks(rng)
    payload = stack_payload(stacks, [1, 2, 3]) | {"m.head.weight": np.zeros((3, 4))}
    assert all(k.startswith(MERGE_PREFIX) for k in stack_payload(stacks, [2]))
    assert sorted(without_stacks(payload)) == ["m.head.weight"]
    scale = {s.rank: s.scaling for s in stacks.values()}.__getitem__
    node = NodeBase().merged(payload, [1, 2], scale)
    assert node.last_merged == 2
    again = node.merged(payload, [1, 2, 3], scale)  # 1 and 2 are already in
    server = {}
    for r in (1, 2, 3):
        server = merge_into_base(server, stacks[r])
    for module, value in server.items():
        np.testing.assert_array_equal(again.delta[module], value)  # bit for bit
    assert base_disagreement(again.report(), 3, server) is None


def test_a_drifted_base_is_told_apart_and_reset_starts_over():
    rng = np.random.default_rng(2)
    stacks = _stacks(rng)
    scale = {s.rank: s.scaling for s in stacks.values()}.__getitem__
    payload = stack_payload(stacks, [1, 2, 3])
    behind = NodeBase().merged(payload, [1], scale)
    server = merge_into_base(merge_into_base({}, stacks[1]), stacks[2])
    assert "merged up to round 1" in base_disagreement(behind.report(), 2, server)
    wrong = NodeBase().merged(payload, [1, 3], scale)  # skipped round 2, claims it is at 3
    assert "fingerprint differs" in base_disagreement(
        wrong.report(), 3, merge_into_base(server, stacks[3])
    )
    fresh = wrong.merged(payload, [1, 2], scale, reset=True)
    assert base_disagreement(fresh.report(), 2, server) is None


def test_a_missing_stack_is_an_error():
    with pytest.raises(AdapterError, match="Stack of round 4 is missing"):
        NodeBase().merged({}, [4], lambda r: 1.0)
