"""The causal-LM path end to end: federated rounds of instruction tuning, FLoRA on GPT-2.

A tiny random Llama (2 layers, hidden 32) with the embedded SmolLM2 tokenizer and its chat
template stands in for the decoder; the data is the real chatterbot corpus.
"""

from __future__ import annotations

import numpy as np
import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fedlora.config import RunConfig
from fedlora.data.instruct import (
    IGNORE_INDEX,
    encode_example,
    user_turn,
)
from fedlora.data.tables import eval_subset, load_table, tokenize
from fedlora.lora.spec import LoraSpec
from fedlora.model.lm import evaluate_lm
from fedlora.model.models import load_tokenizer
from fedlora.run import results
from tests.helpers import make_tiny_gpt2, simulate_in_process

SPEC = LoraSpec(rank=4, alpha=8.0, target_modules=("auto",), task="causal-lm")


def _tokenizer(folder):
    return load_tokenizer(str(folder), "causal-lm")


def _run(tiny_llama, out, **extra):
    return {
        "task": "causal-lm",
        "model": str(tiny_llama),
        "dataset": "chatterbot",
        "partitioner": "iid",
        "num-server-rounds": 2,
        "clients-per-round": 2,
        "min-replies": 2,
        "num-partitions": 3,
        "local-steps": 6,
        "batch-size": 8,
        "lr": 0.05,
        "max-seq-len": 48,
        "eval-examples": 48,
        "eval-batch-size": 16,
        "output-dir": str(out),
        **extra,
    }


@pytest.mark.parametrize(
    "strategy, extra",
    [
        ("fedavg", {}),
        pytest.param("ffa_lora", {"lora-alpha": 32.0}, marks=pytest.mark.slow),
        pytest.param(  # FLoRA on a decoder: the GPT-style test below
            "flora", {"client-ranks": "2,4,8", "lora-rank": 8}, marks=pytest.mark.slow
        ),
        pytest.param("lora_fair", {}, marks=pytest.mark.slow),
        (
            "fedavg",
            {
                "dp": True,
                "dp-noise": 0.8,
                "uplink-density": 0.25,
                "uplink-values": "int8",
                "downlink-values": "fp16",
            },
        ),
    ],
)
def test_two_federated_rounds_of_instruction_tuning(tiny_llama, tmp_path, strategy, extra):
    out = tmp_path / strategy
    overrides = _run(tiny_llama, out, strategy=strategy, **extra)
    simulate_in_process(overrides)
    records = results.read_records(out)
    assert [r["round"] for r in records] == [0, 1, 2]
    for r in records[1:]:
        assert not r["skipped"] and r["num_ok"] == 2, r.get("nodes")
        assert np.isfinite(r["eval_loss"]) and r["eval_perplexity"] == pytest.approx(
            np.exp(r["eval_loss"])
        )
    if strategy in ("ffa_lora", "flora"):
        assert max(r["aggregation_error"] for r in records[1:]) < 1e-5
    if not extra.get("dp"):  # the held-out loss of the tiny random decoder falls
        assert records[-1]["eval_loss"] < records[0]["eval_loss"]
    else:
        assert all(n["epsilon"] > 0 for r in records[1:] for n in r["nodes"])
        assert records[-1]["bytes_up"] < records[-1]["dense_up"] / 2
    samples = (out / results.SAMPLES_FILE).read_text()
    assert "before training" in samples and "after training" in samples
    summary = (out / results.SUMMARY_FILE).read_text()
    assert "held-out perplexity" in summary
    assert "**LoRA modules**: k_proj,o_proj,q_proj,v_proj" in summary  # what auto resolved to
    if strategy == "flora":
        assert (out / "merged-model" / "config.json").is_file()
    if strategy != "fedavg" or extra:
        return
    # the exported adapter loads with peft alone, reproduces the last evaluation, generates
    cfg = RunConfig.from_mapping(overrides)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama), out / "adapter"
    )
    data = tokenize(
        eval_subset(load_table(cfg.data).test, cfg.eval_examples, cfg.seed),
        _tokenizer(tiny_llama),
        cfg.max_seq_len,
        cfg.task,
    )
    loss, exact, _ = evaluate_lm(model, data, 16, show_progress=False)
    assert loss == pytest.approx(records[-1]["eval_loss"], rel=1e-5)
    assert exact == records[-1]["eval_accuracy"]
    prompt = _tokenizer(tiny_llama)("hello", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 4


def test_gpt_style_decoder_without_a_chat_template_runs_flora(tmp_path):
    """GPT-2 keeps W transposed (Conv1D): FLoRA's merged stacks must land the right way."""
    gpt2 = make_tiny_gpt2(tmp_path / "gpt2")
    tok = _tokenizer(gpt2)
    assert not tok.chat_template
    _, labels, _ = encode_example(tok, user_turn("hi"), "hello", 32)
    assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == "hello<|im_end|>"
    out = tmp_path / "run"
    overrides = _run(gpt2, out, strategy="flora", **{"client-ranks": "2,4,8", "lora-rank": 8})
    simulate_in_process(overrides)
    records = results.read_records(out)
    assert [r["round"] for r in records] == [0, 1, 2]
    for r in records[1:]:
        assert r["num_ok"] == 2 and r["aggregation_error"] < 1e-5
    assert records[-1]["eval_loss"] < records[0]["eval_loss"]
    assert (out / "merged-model" / "config.json").is_file()
