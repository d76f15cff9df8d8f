"""ClientPlan: what a round's instructions mean, checked against a direct reading of them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedlora.lora.plan import PLAN_VERSION, ClientPlan
from fedlora.lora.seeded import seeded_a
from fedlora.lora.state import AdapterError
from tests.helpers import random_state

A, B, HEAD = "m.q.lora_A.weight", "m.q.lora_B.weight", "m.head.weight"


def _tensors(rng, rank=4):
    state = random_state(rng, rank)
    return {k: v for k, v in state.to_state_dict().items() if k.startswith(("m.q.", "m.head"))}


def test_a_default_plan_starts_from_what_was_received():
    rng = np.random.default_rng(0)
    fresh, received = _tensors(rng), _tensors(rng)
    start = ClientPlan(rank=4).start(fresh, received)
    for key in fresh:
        np.testing.assert_array_equal(start[key], received[key])


def test_reinit_keeps_the_fresh_a_zeroes_b_and_still_loads_the_head():
    rng = np.random.default_rng(1)
    fresh, received = _tensors(rng), _tensors(rng)
    start = ClientPlan(rank=4, reinit=True).start(fresh, received)
    np.testing.assert_array_equal(start[A], fresh[A])
    np.testing.assert_array_equal(start[B], np.zeros_like(fresh[B]))
    np.testing.assert_array_equal(start[HEAD], received[HEAD])


def test_a_from_seed_is_the_shared_draw_at_the_plan_rank():
    rng = np.random.default_rng(2)
    fresh, received = _tensors(rng), _tensors(rng)
    plan = ClientPlan(rank=4, a_from_seed=True, init_seed=7)
    start = plan.start(fresh, received)
    np.testing.assert_array_equal(start[A], seeded_a("m.q", 4, fresh[A].shape[1], 7))
    np.testing.assert_array_equal(start[B], received[B])


def test_freeze_and_send_decide_what_is_trained_and_replied():
    plan = ClientPlan(rank=4, freeze_a=True, send_a=False)
    assert not plan.trains(A) and plan.trains(B) and plan.trains(HEAD)
    reply = plan.reply({A: np.zeros(1), B: np.zeros(1), HEAD: np.zeros(1)})
    assert sorted(reply) == sorted([B, HEAD])


def test_reply_shapes_follow_the_plan_rank():
    current = random_state(np.random.default_rng(3), rank=8)
    shapes = ClientPlan(rank=2, send_a=False).reply_shapes(current)
    assert shapes["m.q.lora_B.weight"] == (6, 2) and "m.q.lora_A.weight" not in shapes
    assert shapes["m.head.weight"] == (3, 4)
    assert ClientPlan(rank=2).reply_shapes(current)["m.v.lora_A.weight"] == (2, 7)


def test_the_uplink_reference_is_what_both_ends_can_rebuild():
    rng = np.random.default_rng(4)
    received = _tensors(rng)
    shapes = {k: v.shape for k, v in received.items()}
    plain = ClientPlan(rank=4).reference(shapes, received)
    assert sorted(plain) == sorted(received)  # everything received
    flora = ClientPlan(rank=4, reinit=True, a_from_seed=True, init_seed=3).reference(
        shapes, received
    )
    np.testing.assert_array_equal(flora[A], seeded_a("m.q", 4, shapes[A][1], 3))
    np.testing.assert_array_equal(flora[B], np.zeros(shapes[B], np.float32))
    fresh_a = ClientPlan(rank=4, reinit=True).reference(shapes, received)
    assert A not in fresh_a  # the model's own random A: only the node knows it


def test_the_plan_round_trips_as_versioned_json():
    plan = ClientPlan(rank=3, freeze_a=True, merge_rounds=(2, 5), reset_base=True)
    text = plan.to_json()
    assert json.loads(text)["version"] == PLAN_VERSION
    assert ClientPlan.from_json(text) == plan


@pytest.mark.parametrize(
    "text, words",
    [
        (json.dumps({"version": PLAN_VERSION + 1, "rank": 4}), "different fedlora versions"),
        (json.dumps({"version": PLAN_VERSION, "rank": 4, "surprise": 1}), "unknown fields"),
        ("{not json", "not readable"),
        (json.dumps({"version": PLAN_VERSION, "rank": 0}), "must be > 0"),
    ],
)
def test_a_plan_the_node_cannot_follow_is_refused(text, words):
    with pytest.raises(AdapterError, match=words):
        ClientPlan.from_json(text)
