"""One node's local job: data partition, LoRA model, training and evaluation.

Built from a message: the server sends its validated run configuration (the one
source of defaults) and this node's instructions (rank, freeze-A, re-init); the node
adds what only it knows (its partition or its own data file, from the node config).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import transformers
from flwr.app import Context, Message
from peft import PeftModel
from torch.utils.data import TensorDataset

from fedlora.clients.data_cache import cache_dir, cache_key, file_stamp, load_or_build
from fedlora.clients.node_state import NodeStore
from fedlora.config import CAUSAL_LM, ConfigError, NodeConfig, RunConfig
from fedlora.data.files import read_frame
from fedlora.data.instruct import is_labelled_only, questions_from_labels, read_instruction_file
from fedlora.data.tables import (
    TEST_FRACTION,
    encode_labels,
    load_table,
    partition,
    read_user_file,
    tokenize,
)
from fedlora.lora.base_merge import merge_received_stacks
from fedlora.lora.lowrank import fingerprint
from fedlora.lora.plan import start_tensors
from fedlora.lora.spec import LoraSpec
from fedlora.lora.state import A_SUFFIX, B_SUFFIX, state_from_dict
from fedlora.model.models import apply_base_delta, build_lora_model, load_tokenizer, lora_spec
from fedlora.model.peft_state import load_into_peft, state_from_peft
from fedlora.model.train import evaluate, make_optimizer, sampled_loader, train_steps
from fedlora.privacy.dp_sgd import PrivacyBudget, default_delta, make_private, new_budget
from fedlora.wire import protocol
from fedlora.wire.codec import Codec, CompressionError
from fedlora.wire.links import apply_downlink, encode_uplink, uplink_reference
from fedlora.wire.records import from_arrayrecord

BASE_STATE = "merged-base"
"""Store name of the node's merged FLoRA base."""
PRIVACY_STATE = "privacy"
"""Store name of the node's DP budget (accountant history, sigma, q, delta)."""

DATA_FORMAT = 1
"""Bump when tokenisation changes, so cached data from older code is not reused."""

_DATA_CACHE: dict[tuple[Any, ...], tuple[TensorDataset, TensorDataset]] = {}


def _configure_threads() -> None:
    """One intra-op thread per client unless told otherwise (clients share few cores)."""
    threads = int(os.environ.get("FEDLORA_CLIENT_THREADS", os.environ.get("OMP_NUM_THREADS", "1")))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(max(1, threads))


@dataclass
class LocalJob:
    """Everything one train/evaluate message asks of this node."""

    cfg: RunConfig
    node: NodeConfig
    server_round: int
    rank: int
    freeze_a: bool
    reinit: bool
    init_seed: int
    a_from_seed: bool
    send_a: bool
    merge_rounds: tuple[int, ...]
    reset_base: bool
    store: NodeStore
    label_names: tuple[str, ...]
    tensors: dict[str, np.ndarray]

    @classmethod
    def from_message(cls, msg: Message, context: Context) -> LocalJob:
        """Parse the server's instructions and this node's own configuration."""
        config = msg.content.config_records[protocol.CONFIG]
        cfg = RunConfig.from_mapping(json.loads(str(config[protocol.RUN_CONFIG])))
        node = NodeConfig.from_mapping(context.node_config)
        arrays = msg.content.array_records.get(protocol.ARRAYS)
        store = NodeStore(context, node_state_dir(cfg, node))
        tensors = {} if arrays is None else from_arrayrecord(arrays)
        if protocol.DOWNLINK_BASE in config:
            tensors = receive_downlink(
                store,
                tensors,
                int(config[protocol.DOWNLINK_BASE]),
                int(config[protocol.SERVER_ROUND]),
            )
        return cls(
            cfg=cfg,
            node=node,
            server_round=int(config.get(protocol.SERVER_ROUND, 0)),
            rank=int(config.get(protocol.RANK, cfg.lora_rank)),
            freeze_a=bool(config.get(protocol.FREEZE_A, False)),
            reinit=bool(config.get(protocol.REINIT, False)),
            init_seed=int(config.get(protocol.INIT_SEED, cfg.seed)),
            a_from_seed=bool(config.get(protocol.A_FROM_SEED, False)),
            send_a=bool(config.get(protocol.SEND_A, True)),
            merge_rounds=tuple(int(r) for r in config.get(protocol.MERGE_ROUNDS, [])),
            reset_base=bool(config.get(protocol.RESET_BASE, False)),
            store=store,
            label_names=tuple(str(x) for x in config.get(protocol.LABEL_NAMES, [])),
            tensors=tensors,
        )

    @property
    def spec(self) -> LoraSpec:
        """The LoRA layout this node trains this round."""
        return lora_spec(self.cfg).with_rank(self.rank)

    @property
    def partition_key(self) -> int:
        """A stable per-node number for seeding (partition id, or a hash of the data path)."""
        if self.node.partition_id is not None:
            return self.node.partition_id
        return sum(ord(ch) for ch in str(self.node.data_path)) % 100_003

    def data(self) -> tuple[TensorDataset, TensorDataset]:
        """This node's (train, held-out) tokenised data, cached per process."""
        c, n = self.cfg, self.node
        key = (
            c.task,
            c.prompt_column,
            c.response_column,
            c.dataset,
            c.text_column,
            c.label_column,
            c.partitioner,
            c.dirichlet_alpha,
            c.partition_column,
            c.seed,
            c.model,
            c.max_seq_len,
            n.partition_id,
            n.num_partitions or c.num_partitions,
            n.data_path,
            self.label_names,
        )
        if key not in _DATA_CACHE:

            def build() -> tuple[TensorDataset, TensorDataset]:
                train_frame, test_frame = self._frames()
                tokenizer = load_tokenizer(c.model, c.task)
                return (
                    tokenize(train_frame, tokenizer, c.max_seq_len, c.task),
                    tokenize(test_frame, tokenizer, c.max_seq_len, c.task),
                )

            # a fresh process (deployment) finds the tokenised data on disk
            folder = cache_dir(node_state_dir(c, n))
            stamps = (file_stamp(n.data_path), file_stamp(c.dataset), file_stamp(c.model))
            stamped = (*key, *stamps, transformers.__version__, DATA_FORMAT)
            _DATA_CACHE[key] = load_or_build(folder, cache_key(stamped), build)
        return _DATA_CACHE[key]

    def _frames(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        c, n = self.cfg, self.node
        if n.data_path is not None:
            frame = self._own_file(Path(n.data_path))
            order = np.random.default_rng(c.seed).permutation(len(frame))
            n_test = round(TEST_FRACTION * len(frame)) if len(frame) >= 5 else 0
            test, train = frame.iloc[order[:n_test]], frame.iloc[order[n_test:]]
            return train.reset_index(drop=True), test.reset_index(drop=True)
        table = load_table(c)
        num = n.num_partitions or c.num_partitions
        pid = int(n.partition_id or 0)
        return partition(table.train, c, pid, num), partition(table.test, c, pid, num)

    def _own_file(self, path: Path) -> pd.DataFrame:
        """This node's own data file: labelled rows, or (causal-lm) prompts and responses.

        A labelled file on the causal-lm path becomes questions whose answer is the label,
        as the server's own labelled data does.
        """
        c = self.cfg
        columns = set(read_frame(path).columns)
        labelled = is_labelled_only(columns, c.text_column, c.label_column, c.prompt_column)
        if c.task == CAUSAL_LM and not labelled:
            return read_instruction_file(path, c.prompt_column, c.response_column)
        if not self.label_names:
            raise ConfigError("The server sent no label names for a node with data-path")
        frame = read_user_file(path, c.text_column, c.label_column)
        frame = encode_labels(frame, self.label_names, source=f"data-path {path}")
        if c.task == CAUSAL_LM:
            frame = questions_from_labels(frame, self.label_names, str(path))
        return frame

    def node_info(self) -> dict[str, float]:
        """What this node tells the server about itself: rank, partition, training examples.

        Also where a wrong node-config shows, at the start of the run: a partition
        outside the run's partitions fails here rather than in every training round.
        """
        num = self.node.num_partitions or self.cfg.num_partitions
        pid_ = self.node.partition_id
        if pid_ is not None and not 0 <= pid_ < num:
            raise ConfigError(
                f"Invalid value for 'partition-id': {pid_} not in [0, {num}) "
                "(the run's num-partitions, unless the node-config sets its own)"
            )
        rank = self.node.lora_rank or self.cfg.rank_of_partition(self.node.partition_id)
        pid = -1 if self.node.partition_id is None else self.node.partition_id
        # the server caps this node's later claims at what it declares now
        examples = len(self.data()[0])
        return {
            protocol.NODE_RANK: rank,
            protocol.NODE_PARTITION: pid,
            protocol.NUM_EXAMPLES: examples,
        }

    def merged_base(self) -> tuple[dict[str, np.ndarray], int]:
        """This node's merged base delta after merging the stacks it was sent (FLoRA).

        Returns the delta per module and the last round merged; persisted in the node's
        store so it survives the end of this process.
        """
        stored, meta = self.store.load(BASE_STATE)
        last = 0 if self.reset_base else int(meta.get(protocol.LAST_MERGED, 0))
        base = {} if self.reset_base else stored
        merged, new_last = merge_received_stacks(
            base, last, self.tensors, self.merge_rounds, lambda r: self.spec.with_rank(r).scaling
        )
        changed = self.reset_base or new_last != last
        base, last = merged, new_last
        if changed:
            self.store.save(BASE_STATE, base, {protocol.LAST_MERGED: last})
        return base, last

    def model(self, base: dict[str, np.ndarray] | None = None) -> PeftModel:
        """The LoRA model this round starts from (received adapter, or a fresh one)."""
        num_labels = len(self.label_names) if self.label_names else load_table(self.cfg).num_labels
        spec = self.spec
        model = build_lora_model(self.cfg.model, num_labels, spec, seed=self.init_seed)
        if base:
            apply_base_delta(model, base)
        fresh = state_from_peft(model, spec.scaling).to_state_dict()
        received = {
            k: v for k, v in self.tensors.items() if not k.startswith(protocol.MERGE_PREFIX)
        }
        start = start_tensors(
            fresh,
            received,
            rank=self.rank,
            reinit=self.reinit,
            a_from_seed=self.a_from_seed,
            init_seed=self.init_seed,
        )
        load_into_peft(model, state_from_dict(start, spec.scaling))
        if self.freeze_a:
            for name, param in model.named_parameters():
                if "lora_A" in name:
                    param.requires_grad_(False)
        return model

    def train(self) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Run the local steps; return the trained adapter tensors and the metrics."""
        _configure_threads()
        train_data, _ = self.data()
        if len(train_data) == 0:
            raise ConfigError(f"Node partition {self.node.partition_id} has no training examples")
        base, last_merged = self.merged_base()
        model = self.model(base)
        optimizer = make_optimizer(model, self.cfg.lr)
        seed = self.cfg.seed * 1_000_003 + self.server_round * 1009 + self.partition_key
        private = None
        if self.cfg.dp:
            private = make_private(
                model,
                optimizer,
                train_data,
                budget=self.privacy_budget(len(train_data)),
                clip_norm=self.cfg.dp_clip,
                steps=self.cfg.local_steps,
                # None: noise and sampling from the OS entropy pool, which the server cannot
                # replay; the run's seed only when the user opted out of privacy
                seed=seed if self.cfg.dp_reproducible_noise else None,
            )  # raises BudgetExhaustedError before any step when the budget is spent
            loop_model, loop_optimizer, loader = private.model, private.optimizer, private.loader
        else:
            loop_model, loop_optimizer = model, optimizer
            loader = sampled_loader(train_data, self.cfg.batch_size, self.cfg.local_steps, seed)
        started = time.perf_counter()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            result = train_steps(
                loop_model,
                loop_optimizer,
                loader,
                desc=f"round {self.server_round}",
                show_progress=_progress_enabled(),
            )
        seconds = time.perf_counter() - started
        tensors = state_from_peft(model, self.spec.scaling).to_state_dict()
        if not self.send_a:
            tensors = {k: v for k, v in tensors.items() if not k.endswith(A_SUFFIX)}
        # in the order received: Flower's clipping pairs a reply with its payload by position
        order = [k for k in self.tensors if k in tensors]
        tensors = {k: tensors[k] for k in order + [k for k in tensors if k not in order]}
        started = time.perf_counter()
        tensors = self.encode_reply(tensors)
        encode_seconds = time.perf_counter() - started
        metrics = {
            protocol.NUM_EXAMPLES: len(train_data),
            protocol.TRAIN_LOSS: result.mean_loss,
            protocol.TRAIN_LOSS_FIRST: result.first_loss,
            protocol.TRAIN_SECONDS: seconds,
            "train-steps": result.steps,
            "encode-seconds": encode_seconds,
            protocol.LAST_MERGED: last_merged,
        }
        for i, value in enumerate(fingerprint(base)):
            metrics[f"{protocol.BASE_FINGERPRINT}-{i}"] = value
        if private is not None:
            private.finish()
            self.store.save(PRIVACY_STATE, {}, private.budget.to_state())
            metrics |= {
                protocol.EPSILON: private.budget.epsilon(),
                protocol.DELTA: private.budget.delta,
                "dp-noise-multiplier": private.budget.noise_multiplier,
                "dp-steps": private.budget.steps,
            }
        return tensors, metrics

    def encode_reply(self, trained: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The reply's tensors, encoded as the run's uplink codec says."""
        return encode_reply(
            self.store,
            trained,
            self.tensors,
            codec=self.cfg.uplink,
            rank=self.rank,
            reinit=self.reinit,
            a_from_seed=self.a_from_seed,
            init_seed=self.init_seed,
            server_round=self.server_round,
        )

    def privacy_budget(self, num_examples: int) -> PrivacyBudget:
        """This node's budget: restored from its store, or calibrated once on first use."""
        _, state = self.store.load(PRIVACY_STATE)
        if state:
            return PrivacyBudget.from_state(state)
        c = self.cfg
        return new_budget(
            accountant=c.dp_accountant,
            target_epsilon=c.dp_epsilon,
            delta=c.dp_delta or default_delta(num_examples),
            num_examples=num_examples,
            batch_size=c.batch_size,
            steps_per_round=c.local_steps,
            expected_rounds=c.expected_client_rounds,
            noise_multiplier=c.dp_noise or None,
        )

    def evaluate(self) -> dict[str, float]:
        """Loss and accuracy of the received adapter on this node's held-out data."""
        _configure_threads()
        _, test_data = self.data()
        result = evaluate(
            self.model(), test_data, self.cfg.eval_batch_size, show_progress=_progress_enabled()
        )
        return {
            protocol.NUM_EXAMPLES: result.num_examples,
            protocol.EVAL_LOSS: result.loss,
            protocol.EVAL_ACCURACY: result.accuracy,
        }


def node_state_dir(cfg: RunConfig, node: NodeConfig) -> str | None:
    """Where this node's state also goes on disk: its own state-dir, else one per partition.

    Simulated nodes have no node config of their own, and a resumed simulation starts
    new ones: ``node-state-dir`` lets them find their DP ledger and residuals again.
    """
    if node.state_dir:
        return node.state_dir
    if cfg.node_state_dir and node.partition_id is not None:
        return str(Path(cfg.node_state_dir).expanduser() / f"partition-{node.partition_id}")
    return None


def encode_reply(
    store: NodeStore,
    trained: dict[str, np.ndarray],
    received: dict[str, np.ndarray],
    *,
    codec: Codec,
    rank: int,
    reinit: bool,
    a_from_seed: bool,
    init_seed: int,
    server_round: int,
) -> dict[str, np.ndarray]:
    """A node's reply: the trained tensors, or encoded deltas with error feedback.

    With DP this runs after clipping and noising, so it is post-processing and keeps the
    guarantee. The residual of re-initialised factors (FLoRA's fresh adapters) is
    dropped: the next round trains new factors, which it has nothing to add to.
    """
    if codec.identity:
        return trained
    reference = uplink_reference(
        {k: v.shape for k, v in trained.items()},
        received,
        rank=rank,
        reinit=reinit,
        a_from_seed=a_from_seed,
        init_seed=init_seed,
    )
    residual, _ = store.load(protocol.UPLINK_RESIDUAL)
    if reinit:
        residual = {k: v for k, v in residual.items() if not k.endswith((A_SUFFIX, B_SUFFIX))}
    wire, residual = encode_uplink(trained, reference, residual, codec)
    store.save(protocol.UPLINK_RESIDUAL, residual, {"round": server_round})
    return wire


def receive_downlink(
    store: NodeStore, wire: dict[str, np.ndarray], base_round: int, server_round: int
) -> dict[str, np.ndarray]:
    """The payload the server meant, rebuilt from its deltas and what this node holds.

    Raises when the server encoded against a payload this node does not hold (its state
    was lost): the error reply makes the server send the next payload dense.
    """
    held, meta = store.load(protocol.DOWNLINK_HELD)
    if base_round >= 0 and int(meta.get("round", -1)) != base_round:
        raise CompressionError(
            f"{protocol.DOWNLINK_BASE}={base_round}, but this node holds the payload of round "
            f"{meta.get('round', 'none')}"
        )
    received = apply_downlink(wire, held if base_round >= 0 else None)
    kept = {k: v for k, v in received.items() if not k.startswith(protocol.MERGE_PREFIX)}
    store.save(protocol.DOWNLINK_HELD, kept, {"round": server_round})
    return received


def _progress_enabled() -> bool:
    return os.environ.get("FEDLORA_CLIENT_PROGRESS", "0") == "1"
