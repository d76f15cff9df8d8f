"""SecAgg+ through the real client and server apps (in-process simulation).

The same seed with and without secure aggregation trains the same local updates, so the
round's global adapter must agree up to SecAgg+'s stated quantisation error.
"""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedlora.run import results
from tests.helpers import simulate_in_process, tiny_run


def _adapter(out):
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize(
    "strategy, extra",
    [
        ("fedavg", {}),
        pytest.param("ffa_lora", {"lora-alpha": 64.0}, marks=pytest.mark.slow),  # as fedavg
    ],
)
def test_secure_round_equals_the_plain_round(tiny_model, tmp_path, strategy, extra):
    runs = {}
    for mode in ("off", "secagg+"):
        out = tmp_path / mode.replace("+", "")
        overrides = tiny_run(
            tiny_model,
            out,
            strategy=strategy,
            **{"num-server-rounds": 1, "secure-aggregation": mode},
            **extra,
        )
        simulate_in_process(overrides)
        runs[mode] = out
    plain, secure = _adapter(runs["off"]), _adapter(runs["secagg+"])
    assert plain.keys() == secure.keys()
    record = results.read_records(runs["secagg+"])[1]
    m = record["metrics"]
    assert not record["skipped"] and m["secagg-survivors"] == 2 and m["secagg-dropped"] == 0
    bound = m["secagg-max-quantization-error"]
    assert 0 < bound < 1e-4
    moved = 0.0
    for key in plain:
        diff = np.max(np.abs(plain[key] - secure[key]))
        assert diff <= bound + 1e-6, (key, diff, bound)
        moved = max(moved, float(np.max(np.abs(plain[key]))))
    assert moved > 10 * bound  # the adapter is not trivially zero: the bound means something
    for stage in ("setup", "share-keys", "collect-masked", "unmask"):
        assert m[f"secagg-bytes-up-{stage}"] > 0 and m[f"secagg-seconds-{stage}"] > 0
    assert all(n["status"] == "ok" and n["weight"] > 0 for n in record["nodes"])
    assert record["aggregation_error"] is None  # needs each node's product: never seen


def test_secure_round_on_loopback_over_tls(tiny_model, tmp_path):
    """One SecAgg+ round with real SuperLink and SuperNodes (warm workers), TLS and node
    authentication on, each node also training with DP-SGD: every stage crosses the real
    transport, the round aggregates, and each node's epsilon is recorded."""
    from fedlora.run.certs import make_node_key, make_server_files
    from fedlora.run.launch import local_federation
    from tests.helpers import assert_stopped

    files = make_server_files(tmp_path / "certs", ["127.0.0.1", "localhost"])
    tls = files.as_tls()
    out = tmp_path / "secure"
    overrides = tiny_run(
        tiny_model,
        out,
        **{
            "num-server-rounds": 1,
            "num-partitions": 3,
            "clients-per-round": 3,
            "secure-aggregation": "secagg+",
            "dp": True,
            "dp-noise": 0.8,
        },
    )
    with local_federation(tmp_path / "flwr") as fed:
        fed.start_superlink(simulation=False, tls=tls, node_auth=True)
        for i in range(3):
            key = make_node_key(tmp_path / "certs", f"site-{i}")
            fed.register_node(key.public)
            node_config = {"partition-id": i, "num-partitions": 3}
            fed.start_supernode(f"site-{i}", node_config, tls=tls, auth_key=key.private)
        status = fed.run_app(overrides, timeout=600)
        pids = [p.pid for proc in fed.processes for p in proc.tree()]
    assert status["status"] == "finished:completed", status
    record = results.read_records(out)[1]
    assert not record["skipped"], record["skip_reason"]
    assert record["metrics"]["secagg-survivors"] == 3
    assert {n["status"] for n in record["nodes"]} == {"ok"}
    assert all(n["epsilon"] > 0 for n in record["nodes"])  # each site's own DP noise
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert_stopped(pids)
