"""Benchmark: a fedlora client's local training against a plain PEFT loop, same batches.

    .venv/bin/python simulations/bench_client.py [--reps 3] [-c key=value ...]

The fedlora side is the real ClientApp train handler, called in-process with the message
the FedAvg strategy builds for round 1 of the default scenario (MiniLM + LoRA r=8 on
query,value + head, 20 local steps of 16 x 64 tokens). The reference is the loop a PEFT
user writes: the same model, the same batches in the same order, AdamW, forward,
backward, step, nothing else. Both use the client's thread count. Repetitions alternate
which of the two runs first; the first call of each is a warm-up (caches of the base
model and the data, as in a simulation worker that has served one round).

``-c task=causal-lm ...`` measures the decoder path the same way (the plain loop then uses
transformers' own causal-LM loss).

Ratios: the handler's training loop / the plain loop (goal <= 1.05), and the whole
handler (model from the cached base, load the received adapter, train, extract, encode,
size check) / the plain loop.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
from flwr.app import ConfigRecord, Context, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedlora.clients.app import train as client_train
from fedlora.clients.job import LocalJob
from fedlora.config import RunConfig
from fedlora.data.tables import load_table
from fedlora.model.models import build_lora_model, lora_spec
from fedlora.model.peft_state import state_from_peft
from fedlora.model.train import make_optimizer, sampled_loader
from fedlora.run.cli import parse_overrides
from fedlora.server.federation import build_strategy, round_options
from fedlora.server.flower_strategy import LoraFlowerStrategy
from fedlora.wire import protocol
from fedlora.wire.records import to_arrayrecord


class _OneNode:
    """A Grid of one node that does not answer the server's query (it trains at lora-rank)."""

    def get_node_ids(self) -> list[int]:
        return [1]

    def send_and_receive(self, messages: list, timeout: float | None = None) -> list:
        return []


def plain_peft_loop(job: LocalJob, batches: list) -> float:
    """Seconds of the reference loop over ``batches`` on a fresh copy of the job's model."""
    model = job.model()
    optimizer = make_optimizer(model, job.cfg.lr)
    model.train()
    start = time.perf_counter()
    for input_ids, attention_mask, labels in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "-c", "--config", action="extend", nargs="+", default=[], help="run-config overrides"
    )
    args = parser.parse_args(argv)

    # one node: the strategy would otherwise wait for clients-per-round to connect
    overrides = parse_overrides(args.config) | {"clients-per-round": 1, "min-replies": 1}
    cfg = RunConfig.from_mapping(overrides)
    table = load_table(cfg.data)
    # outside a Flower runtime, messages need the identity the runtime would set
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    strategy = LoraFlowerStrategy(build_strategy(cfg), round_options(cfg))
    spec = lora_spec(cfg)
    model = build_lora_model(cfg.model, table.num_labels, spec, seed=cfg.seed)
    state = strategy.strategy.initial_state(state_from_peft(model, spec.scaling))
    base = ConfigRecord(
        {protocol.RUN_CONFIG: cfg.to_json(), protocol.LABEL_NAMES: list(table.label_names)}
    )
    messages = list(
        strategy.configure_train(1, to_arrayrecord(state.to_state_dict()), base, _OneNode())
    )
    msg = messages[0]
    assert msg.metadata.message_type == MessageType.TRAIN

    def context() -> Context:
        node_config = {"partition-id": 0, "num-partitions": cfg.num_partitions}
        return Context(1, 1, node_config, RecordDict(), {})

    job = LocalJob.from_message(msg, context())
    train_data, _ = job.data()
    seed = cfg.seed * 1_000_003 + job.server_round * 1009 + job.partition_key
    batches = list(sampled_loader(train_data, cfg.batch_size, cfg.local_steps, seed))

    loop, handler, plain = [], [], []
    for rep in range(args.reps + 1):
        if rep % 2:  # alternate which goes first, so neither gains from running second
            reference = plain_peft_loop(job, batches)
        reply = client_train(msg, context())
        metrics = reply.content.metric_records[protocol.METRICS]
        if not rep % 2:
            reference = plain_peft_loop(job, batches)
        if rep == 0:
            continue  # warm-up
        loop.append(float(metrics[protocol.TRAIN_SECONDS]))
        handler.append(float(metrics[protocol.HANDLER_SECONDS]))
        plain.append(reference)

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s)"
    )
    print(
        f"{cfg.task}: {cfg.model} + LoRA r={cfg.lora_rank} ({cfg.lora_targets})"
        f"{' + head' if cfg.task == 'sequence-classification' else ''}, "
        f"{len(batches)} steps of {cfg.batch_size} x {cfg.max_seq_len} tokens, "
        f"{args.reps} repetitions after a warm-up\n"
    )
    print("| measure | min | median | goal |")
    print("|---|---:|---:|---:|")
    for name, values, goal in (
        ("fedlora training loop / plain PEFT loop", loop, "<= 1.05"),
        ("whole train handler / plain PEFT loop", handler, "-"),
    ):
        ratios = [v / p for v, p in zip(values, plain, strict=True)]
        print(f"| {name} | {min(ratios):.3f} | {statistics.median(ratios):.3f} | {goal} |")
    median = statistics.median(plain)
    print(
        f"\n(plain loop median {median:.1f} s, {median / len(batches):.2f} s/step on this machine)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
