"""FedSA-LoRA: A averaged against a numpy reference, each node's own B kept on the node."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
from flwr.app import ConfigRecord

from fedlora.config import ConfigError, RunConfig
from fedlora.lora.plan import ClientPlan
from fedlora.lora.state import AdapterError
from fedlora.run.registry import check_run_strategy, load_strategy_class
from fedlora.server.aggregation import aggregate_round
from fedlora.server.federated_eval import evaluation_messages
from fedlora.server.flower_strategy import RoundOptions
from fedlora.server.reports import RoundReport, round_metrics
from fedlora.strategies.conformance import (
    SimulatedClient,
    assert_conforms,
    check_strategy,
    simulate_round,
)
from fedlora.strategies.fedsa_lora import A_SPREAD, FedSaLora
from fedlora.wire import protocol
from fedlora.wire.records import from_arrayrecord
from tests.strategies.test_builtins import _make, _round

B = ".lora_B.weight"
A = ".lora_A.weight"


def test_conforms():
    assert_conforms(FedSaLora)


def test_the_kit_catches_a_personal_strategy_that_ships_its_personal_factor():
    class Leaky(FedSaLora):
        def payload(self, server_round, node_id, plan, current):
            return current.to_state_dict()  # B travels down

    failed = {r.name: r.detail for r in check_strategy(Leaky) if not r.passed}
    assert "payload carries kept tensors" in failed["aggregation error vs exact average"]


def test_a_is_the_weighted_average_b_stays_zero_and_the_head_is_fedavg():
    n = [10, 30, 60]
    _, current, updates, _w, out = _round(FedSaLora, [4], n)
    p = np.asarray(n, np.float64) / sum(n)  # independent of the strategy's weights
    for m, f in out.factors.items():
        stacked = np.stack([u.state.factors[m].a.astype(np.float64) for u in updates])
        np.testing.assert_allclose(f.a, np.einsum("k,kij->ij", p, stacked), atol=1e-6)
        assert not np.allclose(f.a, current.factors[m].a)  # A moved
        assert not np.any(f.b) and not np.any(current.factors[m].b)  # no B on the server
    for key, value in out.dense.items():
        want = np.average([u.state.dense[key] for u in updates], axis=0, weights=p)
        np.testing.assert_allclose(value, want, atol=1e-6)


def test_a_spread_against_numpy_and_no_aggregation_error_recorded(caplog):
    strategy, current, updates, w, out = _round(FedSaLora, [4], [10, 30, 60])
    num = den = 0.0
    for u, p in zip(updates, w, strict=True):
        for m, f in u.state.factors.items():
            num += p * np.linalg.norm(f.a.astype(np.float64) - out.factors[m].a) ** 2
            den += p * np.linalg.norm(f.a.astype(np.float64)) ** 2
    spread = strategy.extra_round_metrics(updates, w, current, out)[A_SPREAD]
    assert spread == pytest.approx(num / den, rel=1e-5) and spread > 0
    # the server's round: no single global product, so no aggregation error in the record
    report = RoundReport(1)
    with caplog.at_level(logging.INFO):
        options = RoundOptions(min_replies=1)
        result = aggregate_round(strategy, 1, updates, current, report, options, {})
    assert result is not None and np.isnan(report.aggregation_error)
    assert "aggregation error - (personal factors)" in caplog.text and "nan" not in caplog.text
    metrics = round_metrics(report)
    assert "aggregation-error" not in metrics and metrics[A_SPREAD] > 0  # server's own p_k


def test_the_plan_starts_b_from_the_store_or_zero_and_replies_without_it():
    plan = FedSaLora(_make(FedSaLora, [4])[0].lora).client_plan(1, 0, 4)
    assert plan.local_b and not plan.send_b and plan.send_a and plan.trains("m" + B)
    assert ClientPlan.from_json(plan.to_json()) == plan
    fresh = {"m" + A: np.ones((4, 6), np.float32), "m" + B: np.full((5, 4), 7.0, np.float32)}
    received = {"m" + A: np.full((4, 6), 2.0, np.float32), "m" + B: np.full((5, 4), 3.0)}
    first = plan.start(fresh, received)  # nothing stored yet: zero, whatever was received
    np.testing.assert_array_equal(first["m" + B], np.zeros((5, 4)))
    np.testing.assert_array_equal(first["m" + A], received["m" + A])
    own = {"m" + B: np.full((5, 4), 5.0, np.float32)}
    np.testing.assert_array_equal(plan.start(fresh, received, own)["m" + B], own["m" + B])
    with pytest.raises(AdapterError, match="another run"):
        plan.start(fresh, received, {"m" + B: np.zeros((5, 2), np.float32)})
    trained = {"m" + A: np.ones((4, 6), np.float32), "m" + B: np.ones((5, 4), np.float32)}
    assert set(plan.reply(trained)) == {"m" + A}
    assert set(plan.kept(trained)) == {"m" + B}
    assert not plan.reads("m" + B) and plan.reads("m" + A)
    assert ClientPlan(rank=4).kept(trained) == {} and ClientPlan(rank=4).reads("m" + B)
    for bad in ({"send_b": True}, {"freeze_b": True}, {"reinit": True}):
        with pytest.raises(AdapterError, match="local_b"):
            dataclasses.replace(plan, **bad)


def test_simulated_nodes_keep_their_own_b_across_rounds():
    strategy, current, rng = _make(FedSaLora, [4])
    clients = [SimulatedClient(i, n, 4) for i, n in enumerate([10, 30])]
    updates, _ = simulate_round(strategy, 1, current, clients, rng)
    after_one = [dict(c.local) for c in clients]
    assert not any(k.endswith(B) for u in updates for k in strategy.payload(1, 0, u.plan, current))
    assert not np.array_equal(*(next(iter(b.values())) for b in after_one))  # nodes differ
    current = strategy.aggregate(1, updates, np.array([0.25, 0.75]), current)
    still = SimulatedClient(0, 10, 4, step=0.0, local=dict(clients[0].local))  # trains nothing
    simulate_round(strategy, 2, current, [still], rng)
    for key, value in after_one[0].items():  # round 2 started from its round-1 B
        np.testing.assert_array_equal(still.local[key], value)


def test_decode_refuses_a_reply_with_b_and_rebuilds_a_zero_b():
    strategy, current, _ = _make(FedSaLora, [4])
    plan = strategy.client_plan(1, 0, 4)
    tensors = strategy.payload(1, 0, plan, current)
    state = strategy.decode_update(1, plan, tensors, current)
    assert all(not np.any(f.b) for f in state.factors.values())
    with pytest.raises(ValueError, match="lora_B"):
        strategy.decode_update(1, plan, current.to_state_dict(), current)


def test_evaluation_messages_carry_the_eval_plan_and_no_b():
    strategy, current, _ = _make(FedSaLora, [4])
    messages = evaluation_messages(
        3, current, ConfigRecord(), [5, 6], lambda n: strategy.evaluation_plan(3, n, 4)
    )
    assert [m.metadata.dst_node_id for m in messages] == [5, 6]
    for msg in messages:
        config = msg.content.config_records[protocol.CONFIG]
        assert ClientPlan.from_json(str(config[protocol.PLAN])).local_b
        keys = set(from_arrayrecord(msg.content.array_records[protocol.ARRAYS]))
        assert keys and not any(k.endswith(B) for k in keys)
    default = evaluation_messages(3, current, ConfigRecord(), [5])[0]  # other strategies
    config = default.content.config_records[protocol.CONFIG]
    assert ClientPlan.from_json(str(config[protocol.PLAN])) == ClientPlan(rank=current.rank)
    assert set(from_arrayrecord(default.content.array_records[protocol.ARRAYS])) == set(
        current.to_state_dict()
    )


def test_registered_and_refused_without_federated_evaluation():
    assert load_strategy_class("fedsa_lora") is FedSaLora
    with pytest.raises(ConfigError, match=r"'fraction-evaluate': 0\.0.*fedsa_lora"):
        check_run_strategy(RunConfig(strategy="fedsa_lora", fraction_evaluate=0.0))
    assert check_run_strategy(RunConfig(strategy="fedsa_lora", fraction_evaluate=0.5))
    assert check_run_strategy(RunConfig(strategy="fedavg", fraction_evaluate=0.0))


def test_a_node_keeps_its_own_b_across_rounds_and_evaluates_with_it(tiny_model):
    """The real client: two nodes, two rounds; B is stored, reused, and each node's own."""
    from flwr.app import Context, RecordDict

    from fedlora.clients.job import LOCAL_B_STATE
    from fedlora.clients.node_state import NodeStore
    from fedlora.data.tables import load_table
    from fedlora.model.models import build_lora_model, lora_spec
    from fedlora.model.peft_state import state_from_peft
    from tests.helpers import make_job

    cfg = RunConfig(model=str(tiny_model), local_steps=3, lr=0.05, max_seq_len=32)
    spec = lora_spec(cfg)
    strategy = FedSaLora(spec, seed=cfg.seed)
    model = build_lora_model(cfg.model, load_table(cfg.data).num_labels, spec, seed=cfg.seed)
    current = strategy.initial_state(state_from_peft(model, spec.scaling))
    stores = {n: NodeStore(Context(n, n, {}, RecordDict(), {}), None) for n in (0, 1)}

    def job(node, server_round, plan, tensors):
        node_config = {"partition-id": node, "num-partitions": 3}
        return make_job(
            cfg, node_config, server_round=server_round, plan=plan, tensors=tensors,
            store=stores[node],
        )  # fmt: skip

    def train(node, server_round):
        plan = strategy.client_plan(server_round, node, spec.rank)
        j = job(node, server_round, plan, strategy.payload(server_round, node, plan, current))
        reply, metrics = j.train()
        assert reply and not any(k.endswith(B) for k in reply)
        return strategy.decode_update(server_round, plan, reply, current), metrics

    ups = [train(n, 1) for n in (0, 1)]
    own = {n: stores[n].load(LOCAL_B_STATE)[0] for n in (0, 1)}
    assert own[0] and own[0].keys() == own[1].keys()
    assert all(np.any(v) for v in own[0].values())  # trained away from zero
    assert any(not np.allclose(own[0][k], own[1][k]) for k in own[0])  # each node's own
    current = strategy.aggregate(
        1, [_update(n, *u) for n, u in enumerate(ups)], [0.5, 0.5], current
    )

    plan = strategy.evaluation_plan(2, 0, spec.rank)
    shown = {k: v for k, v in current.to_state_dict().items() if plan.reads(k)}
    held = state_from_peft(job(0, 2, plan, shown).model(), spec.scaling).to_state_dict()
    for key, value in own[0].items():  # evaluation: its own B with the new global A
        np.testing.assert_array_equal(held[key], value)
    for key, value in shown.items():
        np.testing.assert_array_equal(held[key], value)

    train(0, 2)  # round 2 starts from the stored B and stores the newly trained one
    again, meta = stores[0].load(LOCAL_B_STATE)
    assert meta["round"] == 2 and any(not np.allclose(again[k], own[0][k]) for k in again)


def _update(node, state, metrics):
    from fedlora.strategies.api import ClientUpdate

    plan = ClientPlan(rank=state.rank, send_b=False, local_b=True)
    return ClientUpdate(node, int(metrics[protocol.NUM_EXAMPLES]), state, metrics, plan)
