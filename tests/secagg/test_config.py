"""What SecAgg+ refuses at config time, with the reason, and the kit's check of the claim."""

from __future__ import annotations

import pytest

from fedlora.config import ConfigError, RunConfig
from fedlora.run.registry import check_run_strategy
from fedlora.strategies.conformance import check_strategy
from fedlora.strategies.flexlora import FlexLora


def _cfg(**extra):
    return RunConfig.from_mapping({"secure-aggregation": "secagg+", **extra})


@pytest.mark.parametrize(
    "extra, key, why",
    [
        ({"uplink-density": 0.1}, "uplink-density", "sparse"),
        ({"uplink-values": "sign"}, "uplink-values", "quantises each value"),
        ({"central-dp": "server", "weighting": "uniform", "min-replies": 4}, "central-dp", "never"),
        ({"client-ranks": "2,4", "lora-rank": 4}, "client-ranks", "same layout"),
        ({"secagg-threshold": 2, "clients-per-round": 4}, "secagg-threshold", "more than half"),
        ({"secagg-modulus": 3000}, "secagg-modulus", "power of 2"),
        ({"secagg-num-shares": 4, "clients-per-round": 6}, "secagg-num-shares", "odd"),
        ({"secure-aggregation": "secagg"}, "secure-aggregation", "must be one of"),
    ],
)
def test_settings_that_cannot_be_masked_are_refused(extra, key, why):
    with pytest.raises(ConfigError, match=f"Invalid value for '{key}'.*{why}"):
        _cfg(**extra)


def test_strategies_without_a_secure_sum_are_refused():
    with pytest.raises(ConfigError, match="'secure-aggregation'.*flexlora.*secure_sum"):
        check_run_strategy(_cfg(strategy="flexlora"))
    for name in ("fedavg", "ffa_lora", "rolora", "fedsvd", "fedrot_lora", "fed_sb"):
        assert check_run_strategy(_cfg(strategy=name)).secure_sum


def test_client_dp_composes():
    assert _cfg(dp=True).secure_aggregation == "secagg+"


def test_the_kit_catches_a_false_secure_sum_claim():
    class Claims(FlexLora):  # FlexLoRA re-factorises the products: not a function of the mean
        secure_sum = True

    (result,) = [c for c in check_strategy(Claims) if c.name == "secure sum claim"]
    assert not result.passed and "differs" in result.detail


def test_a_node_that_requires_secure_aggregation_refuses_a_plain_request():
    import json

    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

    from fedlora.clients.app import train
    from fedlora.config import NodeConfig
    from fedlora.wire import protocol

    node = {"partition-id": 0, "num-partitions": 2, "require-secure-aggregation": True}
    assert NodeConfig.from_mapping(node).require_secure_aggregation
    config = ConfigRecord(
        {
            protocol.RUN_CONFIG: json.dumps(RunConfig().to_mapping()),
            protocol.SERVER_ROUND: 1,
        }
    )
    msg = Message(
        RecordDict({protocol.CONFIG: config}), dst_node_id=7, message_type=MessageType.TRAIN
    )
    context = Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={})
    with pytest.raises(ConfigError, match="require-secure-aggregation=true"):
        train(msg, context)
