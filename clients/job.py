"""What a client does with one message: its plan -> model -> train (DP) -> encode -> reply.

Built from a message: the server sends its validated run configuration (the one source
of defaults), this round's :class:`~fedlora.lora.plan.ClientPlan` and the payload; the
node adds what only it knows (its partition or its own data file, its rank, its state
directory) from its node config. The plan's meaning (the start tensors, what is frozen,
what the reply carries, the uplink's reference) lives in :mod:`fedlora.lora.plan` and the
merged base in :mod:`fedlora.lora.base_merge`; the conformance kit's simulated client
uses the same code.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from logging import WARNING

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.supercore import log
from peft import PeftModel
from torch.utils.data import TensorDataset

from fedlora.clients.node_data import node_data, node_state_dir
from fedlora.clients.node_links import encode_reply, receive_downlink
from fedlora.clients.node_state import NodeStore
from fedlora.config import ConfigError, NodeConfig, RunConfig
from fedlora.data.tables import load_table
from fedlora.lora.base_merge import LAST_MERGED, NodeBase, without_stacks
from fedlora.lora.plan import ClientPlan
from fedlora.lora.spec import LoraSpec
from fedlora.lora.state import state_from_dict
from fedlora.model.calibration import mean_base_gradients
from fedlora.model.device import (
    Placement,
    memory_metrics,
    on_device,
    release,
    start_memory_watch,
)
from fedlora.model.lora_core import attach_core
from fedlora.model.models import BaseLoading, apply_base_delta, build_lora_model, lora_spec
from fedlora.model.peft_state import load_into_peft, state_from_peft
from fedlora.model.train import (
    evaluate,
    example_loader,
    make_optimizer,
    make_scheduler,
    sampled_loader,
    train_steps,
)
from fedlora.privacy.dp_sgd import PrivacyBudget, default_delta, make_private, new_budget
from fedlora.wire import protocol
from fedlora.wire.records import from_arrayrecord

BASE_STATE = "merged-base"
"""Store name of the node's merged base (stacks merged into its base weights)."""
PRIVACY_STATE = "privacy"
"""Store name of the node's DP budget (accountant history, sigma, q, delta)."""
LOCAL_B_STATE = "local-b"
"""Store name of the node's own lora_B (``ClientPlan.local_b``, FedSA-LoRA)."""
CORE_BASES_STATE = "core-bases"
"""Store name of the fixed bases a server sent (``ClientPlan.core_bases``, Fed-SB)."""


def _configure_threads() -> None:
    """One intra-op thread per client unless told otherwise (clients share few cores)."""
    threads = int(os.environ.get("FEDLORA_CLIENT_THREADS", os.environ.get("OMP_NUM_THREADS", "1")))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(max(1, threads))


@dataclass
class LocalJob:
    """Everything one train, evaluate or query message asks of this node."""

    cfg: RunConfig
    node: NodeConfig
    server_round: int
    plan: ClientPlan
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
        plan = (
            ClientPlan.from_json(str(config[protocol.PLAN]))
            if protocol.PLAN in config
            else ClientPlan(rank=cfg.lora_rank, init_seed=cfg.seed)  # a query: no plan
        )
        return cls(
            cfg=cfg,
            node=node,
            server_round=int(config.get(protocol.SERVER_ROUND, 0)),
            plan=plan,
            store=store,
            label_names=tuple(str(x) for x in config.get(protocol.LABEL_NAMES, [])),
            tensors=tensors,
        )

    @property
    def placement(self) -> Placement:
        """Where this node trains and in what precision (its node-config device first)."""
        return Placement.resolve(self.node.device or self.cfg.device, self.cfg.precision)

    @property
    def loading(self) -> BaseLoading:
        """How this node holds the frozen base (device, dtype, quantisation)."""
        return BaseLoading(self.placement, self.cfg.base_quantization)

    @property
    def spec(self) -> LoraSpec:
        """The LoRA layout this node trains this round."""
        return lora_spec(self.cfg).with_rank(self.plan.rank)

    @property
    def partition_key(self) -> int:
        """A stable per-node number for seeding (partition id, or a hash of the data path)."""
        if self.node.partition_id is not None:
            return self.node.partition_id
        return sum(ord(ch) for ch in str(self.node.data_path)) % 100_003

    def data(self) -> tuple[TensorDataset, TensorDataset]:
        """This node's (train, held-out) tokenised data."""
        return node_data(self.cfg, self.node, self.label_names)

    def node_info(self) -> dict[str, float]:
        """What this node tells the server about itself: rank, partition, training examples.

        Also where a wrong node-config shows, at the start of the run: a partition
        outside the run's partitions fails here rather than in every training round.
        """
        num = self.node.num_partitions or self.cfg.num_partitions
        pid = self.node.partition_id
        if pid is not None and not 0 <= pid < num:
            raise ConfigError(
                f"Invalid value for 'partition-id': {pid} not in [0, {num}) "
                "(the run's num-partitions, unless the node-config sets its own)"
            )
        rank = self.node.lora_rank or self.cfg.rank_of_partition(pid)
        _ = self.placement  # a device this node does not have fails here, at the start
        # the server caps this node's later claims at what it declares now
        return {
            protocol.NODE_RANK: rank,
            protocol.NODE_PARTITION: -1 if pid is None else pid,
            protocol.NUM_EXAMPLES: len(self.data()[0]),
        }

    def merged_base(self) -> NodeBase:
        """This node's base after merging the stacks it was sent, kept in its store."""
        delta, meta = self.store.load(BASE_STATE)
        stored = NodeBase(delta, int(meta.get(LAST_MERGED, 0)))
        base = stored.merged(
            self.tensors,
            self.plan.merge_rounds,
            lambda r: self.spec.with_rank(r).scaling,
            reset=self.plan.reset_base,
        )
        if self.plan.reset_base or base.last_merged != stored.last_merged:
            self.store.save(BASE_STATE, dict(base.delta), {LAST_MERGED: base.last_merged})
        return base

    def model(self, base: NodeBase | None = None) -> PeftModel:
        """The LoRA model this round starts from, as the plan says."""
        num_labels = (
            len(self.label_names) if self.label_names else load_table(self.cfg.data).num_labels
        )
        spec = self.spec
        model = build_lora_model(
            self.cfg.model, num_labels, spec, seed=self.plan.init_seed, loading=self.loading
        )
        if self.cfg.gradient_checkpointing:  # non-reentrant: frozen inputs need no grads
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        if base is not None and base.delta:
            apply_base_delta(model, dict(base.delta))
        if self.plan.train_core:  # Fed-SB: an r x r core R between the seeded A and B
            attach_core(model)
        fresh = state_from_peft(model, spec.scaling).to_state_dict()
        local = self.store.load(LOCAL_B_STATE)[0] if self.plan.local_b else None
        if self.plan.core_bases:
            local = self.core_bases()
        start = self.plan.start(fresh, without_stacks(self.tensors), local)
        load_into_peft(model, state_from_dict(start, spec.scaling))
        for name, param in model.named_parameters():
            if param.requires_grad and not self.plan.trains(name):
                param.requires_grad_(False)
        return model

    def core_bases(self) -> dict[str, np.ndarray]:
        """The fixed bases of a ``core_bases`` plan: as sent (then stored), or as stored."""
        stored, meta = self.store.load(CORE_BASES_STATE)
        stored_id = str(meta.get("id", ""))
        bases = self.plan.sent_bases(without_stacks(self.tensors), stored, stored_id)
        if stored_id != self.plan.core_bases or bases is not stored:
            self.store.save(CORE_BASES_STATE, bases, {"id": self.plan.core_bases})
        return bases

    def train(self) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Run the local steps; return the reply's (encoded) tensors and the metrics."""
        placement = self.placement
        start = start_memory_watch(placement.device)
        try:
            tensors, metrics = self._train(placement)
            return tensors, metrics | memory_metrics(placement.device, start)
        finally:  # a long-lived process (a Ray actor) must not grow over rounds
            release(placement.device)

    def _reproducible_noise_asked(self) -> None:
        """The server asked for DP noise it can replay: say so, and refuse if the node does."""
        if self.node.refuse_reproducible_noise:
            raise ConfigError(
                "Invalid value for 'dp-reproducible-noise': True is refused by this node "
                "(node-config refuse-reproducible-noise=true): the server could replay its "
                "DP noise from the run's seed and subtract it"
            )
        log(
            WARNING,
            "Node %s: dp-reproducible-noise=true: this node's DP noise follows the run's "
            "seed, so whoever knows the seed can remove it (NOT PRIVATE)",
            self.node.partition_id,
        )

    def _train(self, placement: Placement) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        _configure_threads()
        cfg = self.cfg
        train_data, _ = self.data()
        if len(train_data) == 0:
            raise ConfigError(f"Node partition {self.node.partition_id} has no training examples")
        if self.plan.calibrate:
            return self._calibrate(placement, train_data)
        base = self.merged_base()
        model = self.model(base)
        optimizer = make_optimizer(model, cfg.lr)
        seed = cfg.seed * 1_000_003 + self.server_round * 1009 + self.partition_key
        accumulation = cfg.grad_accumulation
        private = None
        if cfg.dp:
            if cfg.dp_reproducible_noise:
                self._reproducible_noise_asked()
            private = make_private(
                model,
                optimizer,
                train_data,
                budget=self.privacy_budget(len(train_data)),
                clip_norm=cfg.dp_clip,
                steps=cfg.local_steps,
                # None: noise and sampling from the OS entropy pool, which the server cannot
                # replay; the run's seed only when the user opted out of privacy
                seed=seed if cfg.dp_reproducible_noise else None,
                physical_batch_size=cfg.batch_size if accumulation > 1 else None,
                device=placement.device,
            )  # raises BudgetExhaustedError before any step when the budget is spent
            loop_model, loop_optimizer, loader = private.model, private.optimizer, private.loader
        else:
            loop_model, loop_optimizer = model, optimizer
            micro = cfg.local_steps * accumulation
            loader = sampled_loader(train_data, cfg.batch_size, micro, seed)
        scheduler = self.scheduler(loop_optimizer)
        started = time.perf_counter()
        with torch.random.fork_rng(devices=[]), on_device(placement.device):
            torch.manual_seed(seed)
            result = train_steps(
                loop_model,
                loop_optimizer,
                loader,
                desc=f"round {self.server_round}",
                show_progress=_progress_enabled(),
                accumulation=accumulation,
                placement=placement,
                scheduler=scheduler,
                private=private is not None,
                prox_mu=cfg.fedprox_mu,
            )
        seconds = time.perf_counter() - started
        trained = state_from_peft(model, self.spec.scaling).to_state_dict()
        if self.plan.local_b:  # the node's own lora_B, for its next round and evaluation
            self.store.save(LOCAL_B_STATE, self.plan.kept(trained), {"round": self.server_round})
        tensors = self.plan.reply(trained, without_stacks(self.tensors))
        # in the order received: Flower's clipping pairs a reply with its payload by position
        order = [k for k in self.tensors if k in tensors]
        tensors = {k: tensors[k] for k in order + [k for k in tensors if k not in order]}
        started = time.perf_counter()
        tensors = encode_reply(
            self.store, tensors, self.tensors, self.plan, cfg.uplink, self.server_round
        )
        metrics = {
            protocol.NUM_EXAMPLES: len(train_data),
            protocol.TRAIN_LOSS: result.mean_loss,
            protocol.TRAIN_LOSS_FIRST: result.first_loss,
            protocol.TRAIN_SECONDS: seconds,
            "train-steps": result.steps,
            "lr-last": result.lrs[-1] if result.lrs else cfg.lr,
            "encode-seconds": time.perf_counter() - started,
            **base.report(),
        }
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

    def _calibrate(
        self, placement: Placement, train_data: TensorDataset
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """A ``calibrate`` plan: the mean base-weight gradients, nothing trained.

        The gradients are means over ``calibrate`` examples drawn from the node's data; the
        node counts, as in a training round, all its examples, so the server weights the
        means by the nodes' sizes, which makes their weighted mean estimate the gradient
        over all the sampled nodes' data.
        """
        cfg = self.cfg
        seed = cfg.seed * 1_000_003 + self.server_round * 1009 + self.partition_key
        batches = example_loader(train_data, cfg.batch_size, self.plan.calibrate, seed)
        started = time.perf_counter()
        with torch.random.fork_rng(devices=[]), on_device(placement.device):
            torch.manual_seed(seed)
            grads, seen, loss = mean_base_gradients(self.model(), batches, placement)
        wire = encode_reply(
            self.store, grads, self.tensors, self.plan, cfg.uplink, self.server_round
        )  # gradients have no shared reference, so they travel as they are
        return wire, {
            protocol.NUM_EXAMPLES: len(train_data),
            protocol.TRAIN_LOSS: loss,
            protocol.TRAIN_LOSS_FIRST: loss,
            protocol.TRAIN_SECONDS: time.perf_counter() - started,
            "train-steps": 0,
            "calibration-examples": seen,
        }

    def scheduler(
        self, optimizer: torch.optim.Optimizer
    ) -> torch.optim.lr_scheduler.LRScheduler | None:
        """The learning-rate schedule of this round (``lr-schedule``, ``lr-schedule-span``).

        Over the run, step k of round t is step (t - 1) x local-steps + k of
        num-server-rounds x local-steps; over a round, every round starts again.
        """
        c = self.cfg
        if c.lr_schedule_span == "round":
            total, start = c.local_steps, 0
        else:
            total = c.num_server_rounds * c.local_steps
            start = max(self.server_round - 1, 0) * c.local_steps
        return make_scheduler(optimizer, c.lr_schedule, c.warmup_steps, total, start)

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
            batch_size=c.batch_size * c.grad_accumulation,  # the logical batch
            steps_per_round=c.local_steps,
            expected_rounds=c.expected_client_rounds,
            noise_multiplier=c.dp_noise or None,
        )

    def evaluate(self) -> dict[str, float]:
        """Loss and accuracy of the received adapter on this node's held-out data.

        Under a ``local_b`` plan the model holds the received lora_A and this node's own
        stored lora_B (zero if it never trained).
        """
        _configure_threads()
        _, test_data = self.data()
        placement = self.placement
        try:
            result = evaluate(
                self.model(),
                test_data,
                self.cfg.eval_batch_size,
                show_progress=_progress_enabled(),
                placement=placement,
            )
        finally:
            release(placement.device)
        return {
            protocol.NUM_EXAMPLES: result.num_examples,
            protocol.EVAL_LOSS: result.loss,
            protocol.EVAL_ACCURACY: result.accuracy,
        }


def _progress_enabled() -> bool:
    return os.environ.get("FEDLORA_CLIENT_PROGRESS", "0") == "1"
