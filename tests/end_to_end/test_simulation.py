"""The whole system: in-process simulation, `flwr run` simulation, loopback deployment.

Real parts only: a real (tiny, random) BERT with peft LoRA, real 20 Newsgroups data,
Flower's simulation runtime, and real `flower-superlink` / `flower-supernode`
processes on free loopback ports, stopped by PID when the test ends.
"""

from __future__ import annotations

import json

import pytest
import torch
from flwr.simulation import run_simulation
from peft import PeftModel

from fedlora.clients.app import app as client_app
from fedlora.config import RunConfig
from fedlora.data.tables import eval_subset, load_table, tokenize
from fedlora.model.models import load_base_model, load_tokenizer
from fedlora.model.train import evaluate
from fedlora.run import results
from fedlora.run.launch import local_federation
from fedlora.server.app import make_server_app
from tests.helpers import assert_stopped, read_scalars, simulate_in_process, tiny_run


def _batch(data):
    """The first tensors of a tokenised TensorDataset as model inputs."""
    ids, mask, _ = data.tensors
    return {"input_ids": ids, "attention_mask": mask}


def _check_results(out, rounds, product=True):
    """``product``: the strategy has one global product, so the record has its error."""
    records = results.read_records(out)
    assert [r["round"] for r in records] == list(range(rounds + 1))
    for r in records[1:]:
        assert not r["skipped"] and r["num_ok"] == 2
        if product:
            assert r["aggregation_error"] is not None and r["aggregation_error"] > 0
        assert r["bytes_up"] > 0 and r["bytes_down"] > 0
        assert all(n["status"] == "ok" for n in r["nodes"])
        # where the round's time went, as the overhead benchmark reads it
        assert set(r["phase_seconds"]) == {
            "discover",
            "configure",
            "train",
            "aggregate",
            "federated_eval",
            "evaluate",
        }
        assert sum(r["phase_seconds"].values()) <= r["seconds"]
        for n in r["nodes"]:
            assert n["handler_seconds"] >= n["train_seconds"] > 0
            # a long-lived process (Ray worker, warm worker) reports its start cost with
            # its first message only: usually a query, so often 0 here
            assert n["process_seconds"] >= 0 and n["process_id"] > 0 and n["process_peak_mib"] > 0
    assert (out / results.SUMMARY_FILE).is_file() and (out / results.PLOT_FILE).is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    return records


def test_in_process_simulation_learns_and_writes_results(tiny_model, tmp_path):
    out = tmp_path / "run"
    overrides = tiny_run(tiny_model, out, **{"fraction-evaluate": 0.5, "tracking": "tensorboard"})
    simulate_in_process(overrides)
    records = _check_results(out, rounds=2)
    # the clients' training loss falls (a random tiny BERT learns little beyond the
    # label prior of its skewed partition, so held-out loss is not asserted here)
    assert records[2]["train_loss"] < records[1]["train_loss_first"]
    assert "federated_eval" in records[1]
    # the same numbers reach TensorBoard, one step per round
    scalars = read_scalars(out / "tensorboard")
    assert scalars["eval_accuracy"] == pytest.approx(
        {r["round"]: r["eval_accuracy"] for r in records}
    )
    assert sorted(scalars["aggregation_error"]) == [1, 2]

    # The exported adapter loads with peft alone and reproduces the reported accuracy.
    cfg = RunConfig.from_mapping(overrides)
    table = load_table(cfg.data)
    model = PeftModel.from_pretrained(
        load_base_model(str(tiny_model), table.num_labels), out / "adapter"
    )
    data = tokenize(
        eval_subset(table.test, cfg.eval_examples, cfg.seed),
        load_tokenizer(str(tiny_model)),
        cfg.max_seq_len,
    )
    ev = evaluate(model, data, 100, show_progress=False)
    assert ev.accuracy == pytest.approx(records[-1]["eval_accuracy"], abs=1e-9)
    assert ev.loss == pytest.approx(records[-1]["eval_loss"], rel=1e-5)

    # The export describes itself: labels, tokenizer, a model card, and loads with Auto*.
    from peft import AutoPeftModelForSequenceClassification

    from fedlora.run.predict import predict

    adapter = out / "adapter"
    info = json.loads((adapter / "fedlora.json").read_text())
    assert info["labels"] == list(table.label_names) and info["task"] == cfg.task
    assert (adapter / "tokenizer_config.json").is_file()
    card = (adapter / "README.md").read_text()
    assert "library_name: peft" in card and "num_labels=20" in card and "| 2 |" in card
    auto = AutoPeftModelForSequenceClassification.from_pretrained(adapter, num_labels=20)
    torch.testing.assert_close(
        auto(**{k: v[:4] for k, v in _batch(data).items()}).logits,
        model(**{k: v[:4] for k, v in _batch(data).items()}).logits,
    )
    texts = ["The shuttle launch was delayed by a day.", "The goalie made forty saves."]
    predictions = predict(adapter, texts, max_len=cfg.max_seq_len)
    assert [p.text for p in predictions] == texts
    assert all(p.answer in table.label_names and 0 < p.probability <= 1 for p in predictions)


@pytest.mark.slow  # `fedlora simulate` runs the same `flwr run` (test_the_python_api...)
def test_flwr_run_simulation_one_round(tiny_model, tmp_path):
    out = tmp_path / "sim"
    with local_federation(tmp_path / "flwr") as fed:
        fed.start_superlink(simulation=True)
        status = fed.run_app(
            tiny_run(tiny_model, out, **{"num-server-rounds": 1}),
            {"num-supernodes": 3, "client-resources-num-cpus": 1, "init-args-num-cpus": 2},
            timeout=600,
        )
        pids = [p.pid for p in fed.processes]
    assert status["status"] == "finished:completed"
    _check_results(out, rounds=1)
    assert_stopped(pids)


def test_loopback_deployment_one_round(tiny_model, tmp_path):
    """Two SuperNodes train (one on a partition of the server's dataset, one on its own CSV
    file); a third with a wrong node-config is excluded at the start with the reason
    recorded. The server's dataset is a relative path in the server's working directory;
    the node with its own file runs in another, where that path does not exist, and must
    not be refused for a file it never reads."""
    out = tmp_path / "deploy"
    table = load_table(RunConfig().data)
    names = table.label_names
    rows = table.train.groupby("label").head(20)  # every label: the tiny model has 20
    rows = rows.sample(frac=1.0, random_state=0).assign(
        label=lambda f: [names[i] for i in f["label"]]
    )
    workdir, elsewhere = tmp_path / "flwr", tmp_path / "site-b"
    workdir.mkdir()
    elsewhere.mkdir()
    rows[["text", "label"]].to_csv(workdir / "server-data.csv", index=False)
    csv = elsewhere / "site-b.csv"
    rows.iloc[:60][["text", "label"]].to_csv(csv, index=False)
    with local_federation(workdir) as fed:
        fed.start_superlink(simulation=False)
        fed.start_supernode("site-a", {"partition-id": 0, "num-partitions": 2})
        fed.start_supernode("site-b", {"data-path": str(csv)}, cwd=elsewhere)
        fed.start_supernode("misconfigured", {"partition-id": 5, "num-partitions": 2})
        run = {
            "num-server-rounds": 1,
            "num-partitions": 2,
            "clients-per-round": 3,
            "dataset": "server-data.csv",  # relative: resolved where the server runs
        }
        status = fed.run_app(tiny_run(tiny_model, out, **run), timeout=600)
        pids = [p.pid for p in fed.processes]
        assert len(pids) == 7  # the SuperLink, 3 SuperNodes and their warm workers
    assert status["status"] == "finished:completed"
    records = _check_results(out, rounds=1)
    assert json.loads((out / "run_config.json").read_text())["num-partitions"] == 2
    trained = {n["num_examples"] for n in records[1]["nodes"]}
    assert len(trained) == 2 and 60 - round(0.2 * 60) in trained  # the CSV node's rows
    summary = (out / results.SUMMARY_FILE).read_text()
    assert "excluded nodes" in summary and "'partition-id': 5" in summary
    assert_stopped(pids)


@pytest.mark.slow  # the launcher's status check; every other flwr-run test reads it on success
def test_failed_run_is_reported_not_swallowed(tiny_model, tmp_path):
    """`flwr run` exits 0 on a failed run; the launcher must read the status and raise."""
    from fedlora.run.launch import LaunchError

    out = tmp_path / "fail"
    out.mkdir()
    (out / results.ROUNDS_FILE).write_text(
        "{}\n"
    )  # output-dir already holds a run -> ServerApp fails
    with local_federation(tmp_path / "flwr") as fed:
        fed.start_superlink(simulation=True)
        with pytest.raises(LaunchError, match="finished:failed"):
            fed.run_app(tiny_run(tiny_model, out), {"num-supernodes": 2}, timeout=300)


COMPRESSED = {
    "uplink-density": 0.05,
    "uplink-values": "int8",
    "downlink-density": 0.25,
    "downlink-values": "fp16",
}
SIGNS = COMPRESSED | {"uplink-density": 1.0, "uplink-values": "sign"}  # 1 bit per entry


@pytest.mark.parametrize(
    "strategy, extra",
    [
        ("ffa_lora", {"client-ranks": "2,4,8", "lora-rank": 8, "lora-alpha": 64.0}),
        ("flora", {"client-ranks": "2,4,8", "lora-rank": 8}),
        ("lora_fair", {"server-optimizer": "fedadam"}),  # the server optimiser on top
        ("fedavg", {"dp": True, "dp-noise": 0.8, **COMPRESSED}),  # DP, then compression
        pytest.param(  # compression is covered by fedavg's DP run above
            "flora", {"client-ranks": "2,4,8", "lora-rank": 8, **COMPRESSED}, marks=pytest.mark.slow
        ),
        # the scaled-sign uplink of docs/compression.md; evaluated on a validation split
        ("fedavg", {**SIGNS, "validation-fraction": 0.2, "eval-split": "validation"}),
        ("rolora", {}),
        ("fedsvd", {}),
        ("flexlora", {"client-ranks": "2,4,8", "lora-rank": 8}),
        ("fedrot_lora", {"server-optimizer": "fedavgm"}),
        ("fedex_lora", {}),
        ("fed_sb", {"dp": True, "dp-noise": 0.8, "lora-alpha": 64.0}),  # R only, under DP-SGD
        ("fed_sb_data", {"lora-alpha": 64.0, **COMPRESSED}),  # calibration, then R; codecs
        ("fedsa_lora", {"fraction-evaluate": 1.0}),  # A shared, each node keeps its own B
    ],
)
def test_strategy_runs_in_simulation(tiny_model, tmp_path, strategy, extra):
    """Two rounds of each LoRA-aware strategy through the real client and server apps.

    Three nodes, two sampled per round, so FLoRA must catch up a node that missed a round.
    """
    out = tmp_path / strategy
    if strategy == "fedsa_lora":  # the nodes' own B also on disk, for the test to read
        extra = extra | {"node-state-dir": str(tmp_path / "nodes")}
    overrides = tiny_run(tiny_model, out, strategy=strategy, **{"num-server-rounds": 3}, **extra)
    simulate_in_process(overrides)
    records = _check_results(out, rounds=3, product=strategy not in ("fedsa_lora", "fed_sb_data"))
    errors = [r["aggregation_error"] for r in records[1:]]
    if strategy in ("ffa_lora", "flora", "rolora", "fedsvd"):
        assert max(errors) < 1e-5, errors  # exact strategies, also with mixed ranks
    if strategy in ("rolora", "fedsvd"):  # one factor travels up, both come down
        assert records[1]["bytes_up"] < records[1]["bytes_down"], records[1]
    if strategy == "lora_fair":
        for r in records[1:]:
            assert r["aggregation_error"] <= r["metrics"]["fedavg-error"] + 1e-9
            assert r["metrics"]["fair-floor"] <= r["aggregation_error"] + 1e-6
            # FedAdam moved the adapter, by other than the aggregate's own step
            server, own = r["metrics"]["server-step-norm"], r["metrics"]["aggregate-step-norm"]
            assert server > 0 and own > 0 and abs(server - own) > 1e-3 * own, (server, own)
    if strategy == "ffa_lora":  # only B travels up: a rank-r_k B per module plus the head
        assert records[1]["bytes_up"] < records[1]["bytes_down"] * 2
    if strategy == "fed_sb":
        _check_fed_sb(out, records, overrides)
    if strategy == "fed_sb_data":
        _check_fed_sb_data(out, records, overrides)
    if strategy == "fedsa_lora":
        _check_fedsa_lora(out, records, tmp_path / "nodes")
    if strategy == "fedex_lora":  # the residual in the base makes the update exact
        for r in records[1:]:
            assert r["metrics"]["exact-error"] < 1e-5 and r["aggregation_error"] > 1e-4
            assert r["metrics"]["base-fingerprint-max-diff"] == 0.0
    if strategy == "flora":
        for r in records[2:]:
            assert r["metrics"]["base-fingerprint-max-diff"] == 0.0
        assert "truncation error" in (out / results.SUMMARY_FILE).read_text()
        assert (out / "merged-model" / "config.json").is_file()
    if extra.get("eval-split") == "validation":
        summary = (out / results.SUMMARY_FILE).read_text()
        assert "**evaluated on**: validation split" in summary
        assert "**held out for validation**: 0.2 of the training rows" in summary
    if "uplink-density" in extra:  # a tiny model's tensors are small: keys weigh a lot
        codec = f"up {extra['uplink-density']:g} {extra['uplink-values']}, down 0.25 fp16"
        assert codec in (out / results.SUMMARY_FILE).read_text()
        for r in records[1:]:
            if extra.get("dp"):
                assert all(n["epsilon"] > 0 for n in r["nodes"])
            if r["metrics"].get("sb-init-energy") is not None:
                continue  # Fed-SB's calibration: the gradients travel as they are
            assert r["bytes_up"] < r["dense_up"] / 3, (r["bytes_up"], r["dense_up"])
            assert r["bytes_down"] < r["dense_down"] * 1.2, (r["bytes_down"], r["dense_down"])
    ranks = {n["node_id"] for r in records[1:] for n in r["nodes"]}
    assert len(ranks) >= 2


def _check_fedsa_lora(out, records, nodes):
    """Only A and the head travel; B stays on each node, its own; nodes evaluate the run."""
    import numpy as np
    from safetensors.numpy import load_file

    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    b_keys = sorted(k for k in adapter if k.endswith(".lora_B.weight"))
    assert b_keys and not any(np.any(adapter[k]) for k in b_keys)  # the server holds no B
    shared = sum(v.size for k, v in adapter.items() if k not in b_keys)  # A and the head
    for r in records[1:]:
        assert r["aggregation_error"] is None and r["metrics"]["a-spread"] > 0
        assert r["dense_up"] == r["dense_down"] == 2 * 4 * shared, r  # two nodes, fp32
        assert r["eval_source"] == "federated" and r["federated_eval"]["num-examples"] > 0
        assert r["eval_accuracy"] == r["federated_eval"]["eval-accuracy"]
    own = [load_file(str(p)) for p in sorted(nodes.glob("partition-*/local-b.safetensors"))]
    assert len(own) >= 2  # two nodes a round, three rounds: at least two trained
    for b in own:
        assert sorted(b) == b_keys and all(b[k].shape == adapter[k].shape for k in b_keys)
        assert all(np.any(b[k]) for k in b_keys)  # trained away from peft's zero
    assert any(not np.allclose(own[0][k], own[1][k]) for k in b_keys)  # each node's own
    assert "federated evaluation" in (out / results.SUMMARY_FILE).read_text()


def _check_fed_sb_data(out, records, overrides):
    """Round 1 sends gradients up; then R up, and the fixed bases down once per node."""
    import numpy as np
    from safetensors.numpy import load_file

    from fedlora.lora.plan import core_basis

    seed = RunConfig.from_mapping(overrides).seed
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    modules = [k[: -len(".lora_A.weight")] for k in adapter if k.endswith(".lora_A.weight")]
    a_of = {m: adapter[m + ".lora_A.weight"] for m in modules}
    b_of = {m: adapter[m + ".lora_B.weight"] for m in modules}
    rank = a_of[modules[0]].shape[0]
    head = sum(v.size for k, v in adapter.items() if "lora_" not in k)
    grads = 4 * sum(b_of[m].shape[0] * a_of[m].shape[1] for m in modules)
    bases = 4 * sum(a_of[m].size + b_of[m].shape[0] * rank for m in modules)
    r_and_head = 4 * (len(modules) * rank * rank + head)
    first = records[1]
    assert first["aggregation_error"] is None and 0 < first["metrics"]["sb-init-energy"] <= 1
    for n in first["nodes"]:
        assert n["dense_up"] == grads and n["dense_down"] == 4 * head, (n, grads)
    sent = set()
    for r in records[2:]:
        assert r["aggregation_error"] < 1e-5  # exact: the mean of R
        for n in r["nodes"]:
            assert n["dense_up"] == r_and_head, (n, r_and_head)
            # the bases go to a node once: to every node of round 2, then only to new ones
            assert n["dense_down"] == r_and_head + (0 if n["node_id"] in sent else bases), n
            sent.add(n["node_id"])
    for m in modules:  # fixed data-aware bases: orthonormal rows of A, not the seeded ones
        a = a_of[m]
        np.testing.assert_allclose(a @ a.T, np.eye(rank), atol=1e-5)
        seeded, _ = core_basis(m, rank, a.shape[1], b_of[m].shape[0], seed)
        assert np.abs(np.abs(a @ seeded.T) - np.eye(rank)).max() > 0.1  # another subspace
        assert np.abs(b_of[m]).max() > 0


def _check_fed_sb(out, records, overrides):
    """Exact; r x r per module each way (plus the head); the export is R folded into B."""
    import numpy as np
    from safetensors.numpy import load_file

    from fedlora.lora.plan import core_basis

    assert max(r["aggregation_error"] for r in records[1:]) < 1e-5
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert not any("lora_R" in k for k in adapter)  # a standard peft adapter
    modules = [k[: -len(".lora_A.weight")] for k in adapter if k.endswith(".lora_A.weight")]
    rank = adapter[modules[0] + ".lora_A.weight"].shape[0]
    head = sum(v.size for k, v in adapter.items() if "lora_" not in k)
    wire = 4 * (len(modules) * rank * rank + head)
    seed = RunConfig.from_mapping(overrides).seed
    for m in modules:
        a, b = adapter[m + ".lora_A.weight"], adapter[m + ".lora_B.weight"]
        a0, b0 = core_basis(m, rank, a.shape[1], b.shape[0], seed)
        np.testing.assert_array_equal(a, a0)
        np.testing.assert_allclose(b0 @ (b0.T @ b), b, atol=1e-6)  # b = B R
        assert np.abs(b).max() > 0  # R moved
    for r in records[1:]:
        for n in r["nodes"]:
            assert n["dense_up"] == wire and n["dense_down"] == wire, (n, wire)
            assert n["epsilon"] > 0


def test_failing_strategy_stops_run_without_corrupting_adapter(tiny_model, tmp_path, caplog):
    """A plugin that returns NaN: logged with its name, adapter kept, run stops after N rounds."""
    out = tmp_path / "broken"
    overrides = tiny_run(
        tiny_model,
        out,
        strategy="tests.strategies.test_conformance:ProducesNan",
        **{"num-server-rounds": 4, "max-failed-rounds": 2},
    )
    from fedlora.server.federation import StrategyFailedError

    with pytest.raises(StrategyFailedError, match="failed in 2 rounds"):
        simulate_in_process(overrides)
    records = results.read_records(out)
    assert [r["round"] for r in records] == [0, 1, 2]  # stopped after 2 failed rounds
    for r in records[1:]:
        assert r["skipped"] and "NaN or Inf" in r["strategy_error"]
        assert r["eval_accuracy"] == records[0]["eval_accuracy"]  # adapter unchanged
    assert "strategy failed" in (out / results.SUMMARY_FILE).read_text()
    assert "test_conformance.ProducesNan) failed" in caplog.text


def test_dp_simulation_true_epsilon_and_budget_declines(tiny_model, tmp_path):
    """DP-SGD through the real apps: epsilon grows per node and a spent node declines."""
    out = tmp_path / "dp"
    overrides = tiny_run(
        tiny_model,
        out,
        **{
            "num-server-rounds": 4,
            "min-replies": 1,
            "dp": True,
            "dp-epsilon": 4.0,
            "dp-expected-rounds": 1,
            "dp-clip": 1.0,
        },
    )
    simulate_in_process(overrides)
    records = results.read_records(out)
    nodes = [n for r in records[1:] for n in r["nodes"]]
    declined = [n for n in nodes if n["status"] == "declined"]
    assert declined and "privacy budget exhausted" in declined[0]["reason"]
    for d in declined:  # a declined node is never sampled again
        later = [
            r
            for r in records
            if r["round"] > 0 and any(n["node_id"] == d["node_id"] for n in r["nodes"])
        ]
        assert later[-1]["nodes"][0] is not None
        assert all(
            n["status"] == "declined"
            for r in later[-1:]
            for n in r["nodes"]
            if n["node_id"] == d["node_id"]
        )
    eps = [n["epsilon"] for n in nodes if n["status"] == "ok"]
    assert eps and all(0 < e <= 4.0 * 1.001 for e in eps)
    assert "worst-case client epsilon" in (out / results.SUMMARY_FILE).read_text()


@pytest.mark.slow  # the warm-worker test compares two seeded runs bit for bit
def test_same_seed_same_run(tiny_model, tmp_path):
    """Two launches with one seed sample the same partitions and give the same numbers,
    although Flower draws different node ids each time."""
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        run_simulation(
            make_server_app(tiny_run(tiny_model, out, **{"num-server-rounds": 2})),
            client_app,
            num_supernodes=3,
            backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}},
        )
        runs.append(results.read_records(out))
    for ra, rb in zip(*runs, strict=True):
        assert ra["eval_accuracy"] == rb["eval_accuracy"]
        assert ra["eval_loss"] == pytest.approx(rb["eval_loss"], rel=1e-6)
        if ra["round"]:
            assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-6)
            assert sorted(n["num_examples"] for n in ra["nodes"]) == sorted(
                n["num_examples"] for n in rb["nodes"]
            )


def test_a_run_in_which_no_round_aggregated_fails_and_says_so(tiny_model, tmp_path):
    """lr=1e30: every client fails with a NaN loss and every round is skipped. The run used to
    exit 0 as completed; now the ServerApp fails and the summary says why."""
    from fedlora.server.federation import RunFailedError

    out = tmp_path / "nothing"
    with pytest.raises(RunFailedError, match="no round aggregated anything"):
        simulate_in_process(tiny_run(tiny_model, out, **{"num-server-rounds": 1, "lr": 1e30}))
    summary = (out / results.SUMMARY_FILE).read_text()
    assert "FAILED: no round aggregated anything" in summary


def test_a_sample_larger_than_the_simulation_is_refused_at_once(tiny_model, tmp_path):
    """Without the check the round waits out node-wait-timeout for a node that never comes."""
    from fedlora.config import ConfigError

    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="'clients-per-round': 3 exceeds the simulation's 2"):
        simulate_in_process(tiny_run(tiny_model, out, **{"clients-per-round": 3}), 2)
    assert not out.exists()  # refused before anything was written


def test_the_python_api_runs_a_simulation_and_reads_it_back(tiny_model, tmp_path):
    """What a notebook does: fedlora.run.api.simulate, then load_results."""
    from fedlora.run.api import load_results, simulate

    out = tmp_path / "api"
    config = tiny_run(tiny_model, out, **{"num-server-rounds": 1})
    config.pop("output-dir")
    folder = simulate(config, supernodes=3, output_dir=out)
    run = load_results(folder)
    assert folder == out.resolve() and [r["round"] for r in run.records] == [0, 1]
    assert run.final_accuracy is not None and "fedlora run summary" in run.summary
