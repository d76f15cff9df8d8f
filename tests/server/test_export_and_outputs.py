"""The run's files without running a federation: export, resume, round records."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.numpy import load_file
from torch.utils.data import TensorDataset

from fedlora.config import ConfigError, RunConfig
from fedlora.lora.spec import LoraSpec
from fedlora.lora.state import AdapterState, LoraFactors
from fedlora.model.models import build_lora_model, load_base_model, lora_spec
from fedlora.model.peft_state import state_from_peft
from fedlora.run import results
from fedlora.run.checkpoint import save_checkpoint
from fedlora.server.evaluation import ServerEvaluator
from fedlora.server.export import export_adapter
from fedlora.server.outputs import prepare_output, resume, server_state
from fedlora.server.reports import NodeOutcome, RoundReport, round_metrics, training_record
from fedlora.strategies.fedavg import FedAvg
from fedlora.strategies.flora import Flora


def _evaluator(cfg):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randint(100, 2000, (16, 12), generator=g),
        torch.ones(16, 12, dtype=torch.long),
        torch.randint(0, 20, (16,), generator=g),
    )
    return ServerEvaluator(cfg, 20, data)


def _trained_state(cfg, seed=1):
    spec = lora_spec(cfg)
    model = build_lora_model(cfg.model, 20, spec, seed=0)
    state = state_from_peft(model, spec.scaling)
    rng = np.random.default_rng(seed)
    factors = {
        m: LoraFactors(f.a, (0.1 * rng.standard_normal(f.b.shape)).astype(np.float32))
        for m, f in state.factors.items()
    }
    return AdapterState(factors, state.dense, state.scaling)


def test_the_exported_adapter_loads_with_peft_and_holds_the_global_tensors(tiny_model, tmp_path):
    cfg = RunConfig(model=str(tiny_model), lora_rank=4)
    state = _trained_state(cfg)
    strategy = FedAvg(lora_spec(cfg))
    export_adapter(tmp_path, cfg, _evaluator(cfg), state, strategy)
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    for key, value in state.to_state_dict().items():
        peft_key = key.replace(".default", "")
        np.testing.assert_array_equal(saved[peft_key], value)
    model = PeftModel.from_pretrained(load_base_model(str(tiny_model), 20), tmp_path / "adapter")
    assert model is not None


def test_a_merged_base_is_exported_as_an_svd_adapter_with_its_error(tiny_model, tmp_path):
    cfg = RunConfig(model=str(tiny_model), lora_rank=4, strategy="flora")
    state = _trained_state(cfg)
    strategy = Flora(lora_spec(cfg))
    rng = np.random.default_rng(5)
    strategy.ledger.merged = {  # what two rounds of stacks would have merged
        m: (0.01 * rng.standard_normal((f.b.shape[0], f.a.shape[1]))).astype(np.float32)
        for m, f in state.factors.items()
    }
    summary = export_adapter(tmp_path, cfg, _evaluator(cfg), state, strategy)
    meta = json.loads((tmp_path / "adapter" / "state.json").read_text())
    # the reported error is the relative Frobenius norm of the dropped singular values
    num = den = 0.0
    for m, f in state.factors.items():
        total = strategy.ledger.merged[m] + state.scaling * f.b.astype(np.float64) @ f.a
        s = np.linalg.svd(total, compute_uv=False)
        num, den = num + np.sum(s[4:] ** 2), den + np.sum(s**2)
    assert meta["svd_truncation_error"] == pytest.approx(np.sqrt(num / den), rel=1e-4)
    assert "truncation error" in summary["adapter"]
    assert (tmp_path / "merged-model" / "config.json").is_file()


def _checkpoint(out, cfg, server_round, meta_extra):
    spec = LoraSpec(4, 8.0, ("query", "value"))
    model = build_lora_model(cfg.model, 20, spec, seed=0)
    state = state_from_peft(model, spec.scaling)
    meta = {"round": server_round, "run_config": cfg.to_mapping(), **meta_extra}
    save_checkpoint(out / "checkpoints" / f"round-{server_round:04d}", model, state, meta)


def test_resume_drops_the_records_after_the_checkpoint(tiny_model, tmp_path):
    cfg = RunConfig(model=str(tiny_model), output_dir=str(tmp_path), lora_rank=4)
    prepare_output(cfg)
    for r in range(4):
        results.append_record(tmp_path, {"round": r})
    server = {"rng": None, "nodes": {"node_ranks": {"7": 4}}, "links": {}, "strategy": {}}
    _checkpoint(tmp_path, cfg, 2, {"server_state": server})
    resumed = resume(tmp_path, cfg.replace(resume="latest", num_server_rounds=5))
    assert resumed.round == 2 and resumed.server_state == server
    assert [r["round"] for r in results.read_records(tmp_path)] == [0, 1, 2]
    with pytest.raises(ConfigError, match="already holds a run"):
        prepare_output(cfg)  # not resuming: the folder is taken


def test_a_checkpoint_of_fedlora_0_1_is_read_into_the_new_layout():
    old = {"strategy_state": {"rng": {"s": 1}, "node_ranks": {"3": 4}, "links": {}, "flora": {}}}
    state = server_state(old)
    assert state["rng"] == {"s": 1} and state["nodes"]["node_ranks"] == {"3": 4}
    assert "flora" in state["strategy"]


def test_a_round_record_has_the_metric_record_numbers_and_every_node():
    report = RoundReport(3, sampled=[1, 2, 3])
    report.outcomes = [
        NodeOutcome(1, "ok", num_examples=10, bytes_up=100, bytes_down=200, weight=0.5),
        NodeOutcome(2, "ok", num_examples=10, bytes_up=100, bytes_down=200, weight=0.5),
        NodeOutcome(3, "missing", "no reply before the round timeout", bytes_down=200),
    ]
    report.aggregation_error = 0.25
    report.metrics = {"train-loss": 1.5, "stack-rank": 8.0}
    metrics = round_metrics(report)
    assert metrics["bytes-up"] == 200 and metrics["bytes-down"] == 600
    assert metrics["num-ok"] == 2 and metrics["num-failed"] == 1
    assert metrics["aggregation-error"] == 0.25
    record = training_record(report, metrics)
    assert record["train_loss"] == 1.5 and record["aggregation_error"] == 0.25
    assert [n["status"] for n in record["nodes"]] == ["ok", "ok", "missing"]
    assert record["nodes"][2]["reason"] == "no reply before the round timeout"
    assert record["nodes"][0]["weight"] == 0.5
    report.skip("too few")
    assert training_record(report, round_metrics(report))["aggregation_error"] is None
