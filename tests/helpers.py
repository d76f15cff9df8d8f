"""Shared builders for tests: a tiny random BERT saved as a local model folder."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import BertConfig, BertForSequenceClassification

from fedlora.model.models import EMBEDDED_PACKAGE, package_dir

TOKENIZER_FILES = (
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def make_tiny_bert(folder: Path, num_labels: int = 20, seed: int = 0) -> Path:
    """A 2-layer, hidden-32 BERT with the embedded model's tokenizer, saved to ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=num_labels,
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    source = package_dir(EMBEDDED_PACKAGE) / "model"
    for name in TOKENIZER_FILES:
        shutil.copy(source / name, folder / name)
    return folder


def simulate_in_process(overrides: dict, num_supernodes: int = 3) -> None:
    """The real ServerApp and ClientApp in Flower's simulation runtime, in this process."""
    from flwr.simulation import run_simulation

    from fedlora.clients.app import app as client_app
    from fedlora.server.app import make_server_app

    run_simulation(
        make_server_app(overrides),
        client_app,
        num_supernodes=num_supernodes,
        backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}},
    )


def _smollm2_tokenizer() -> Any:
    """The embedded decoder's tokenizer, read straight from its GGUF file (a few seconds)."""
    from transformers import AutoTokenizer

    from fedlora.model.embedded_decoder import DECODER_PACKAGE, GGUF_FILE

    return AutoTokenizer.from_pretrained(package_dir(DECODER_PACKAGE), gguf_file=GGUF_FILE)


def make_tiny_llama(folder: Path, seed: int = 0, hidden: int = 32) -> Path:
    """A 2-layer Llama (hidden 32 unless told) with the embedded SmolLM2 tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _smollm2_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_tiny_gpt2(folder: Path, seed: int = 0) -> Path:
    """A 2-layer GPT-2 (Conv1D layers, fused c_attn) whose tokenizer has no chat template."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _smollm2_tokenizer()
    tokenizer.chat_template = None
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------- #
# Random adapters and replies for strategy tests                               #
# --------------------------------------------------------------------------- #
import numpy as np  # noqa: E402
from flwr.app import (  # noqa: E402
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from fedlora.lora.state import AdapterState, LoraFactors  # noqa: E402
from fedlora.wire import protocol  # noqa: E402
from fedlora.wire.records import to_arrayrecord  # noqa: E402

MODULES = {"m.q": (6, 5), "m.v": (4, 7)}  # module -> (d_out, d_in)
HEAD = {"m.head.weight": (3, 4)}


def random_state(rng: np.random.Generator, rank: int, scaling: float = 2.0) -> AdapterState:
    """A random adapter over MODULES/HEAD at ``rank``."""
    factors = {
        m: LoraFactors(
            a=rng.standard_normal((rank, d_in)).astype(np.float32),
            b=rng.standard_normal((d_out, rank)).astype(np.float32),
        )
        for m, (d_out, d_in) in MODULES.items()
    }
    dense = {k: rng.standard_normal(s).astype(np.float32) for k, s in HEAD.items()}
    return AdapterState(factors, dense, scaling)


class FakeGrid:
    """A Grid's node listing, for calling configure_train in unit tests.

    Its nodes do not answer the server's query (they train at the run's rank); set
    ``flower.nodes.ranks`` for nodes of other ranks.
    """

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def send_and_receive(self, messages, timeout=None):
        return []


def flower_strategy(cls=None, lora=None, *, seed: int = 0, settings=None, **options):
    """A LoraFlowerStrategy around ``cls`` (default FedAvg) with RoundOptions ``options``."""
    from fedlora.lora.spec import LoraSpec
    from fedlora.server.flower_strategy import LoraFlowerStrategy, RoundOptions
    from fedlora.server.weights import WeightPolicy
    from fedlora.strategies.fedavg import FedAvg

    weights = {
        k: options.pop(k) for k in ("weighting", "max_share", "max_claim_ratio") if k in options
    }
    if weights:
        options["weights"] = WeightPolicy(**weights)
    options.setdefault("seed", seed)
    strategy = (cls or FedAvg)(lora or LoraSpec(4, 8.0, ("q", "v")), seed=seed, settings=settings)
    return LoraFlowerStrategy(strategy, RoundOptions(**options))


def reply(instruction: Message, tensors: dict, num_examples: float, **metrics: float) -> Message:
    """A client's train reply to ``instruction``."""
    content = RecordDict(
        {
            protocol.ARRAYS: to_arrayrecord(tensors),
            protocol.METRICS: MetricRecord(
                {protocol.NUM_EXAMPLES: num_examples, protocol.TRAIN_LOSS: 1.0, **metrics}
            ),
        }
    )
    return Message(content, reply_to=instruction)


def error_reply(instruction: Message, reason: str | None) -> Message:
    """A failed node's error reply."""
    return Message(Error(code=1, reason=reason), reply_to=instruction)


def instruction(node_id: int) -> Message:
    """A bare train instruction to ``node_id`` (for replies built without a strategy)."""
    return Message(
        RecordDict({protocol.CONFIG: ConfigRecord()}),
        dst_node_id=node_id,
        message_type=MessageType.TRAIN,
    )


def read_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """Scalars of the TensorBoard event files under ``folder`` (TFRecord framing, read
    directly so the test needs no TensorBoard install)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, dict[int, float]] = {}
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4  # length, its crc, the record, its crc
            for value in event.summary.value:
                out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out


def make_job(cfg, node_config: dict, **fields):
    """A node's LocalJob for ``cfg`` without a message (round 1, no received tensors)."""
    from flwr.app import Context, RecordDict

    from fedlora.clients.job import LocalJob
    from fedlora.clients.node_state import NodeStore
    from fedlora.config import NodeConfig
    from fedlora.lora.plan import ClientPlan

    context = Context(1, 1, dict(node_config), RecordDict(), {})
    values = {
        "cfg": cfg,
        "node": NodeConfig.from_mapping(node_config),
        "server_round": 1,
        "plan": ClientPlan(rank=cfg.lora_rank),
        "store": NodeStore(context, None),
        "label_names": (),
        "tensors": {},
    }
    return LocalJob(**(values | fields))


def tiny_run(tiny_model, out, **extra):
    """The overrides of a short run on the tiny model (2 rounds, 3 partitions)."""
    return {
        "model": str(tiny_model),
        "num-server-rounds": 2,
        "clients-per-round": 2,
        "min-replies": 2,
        "num-partitions": 3,
        "local-steps": 8,
        "lr": 0.02,
        "max-seq-len": 32,
        "eval-examples": 200,
        "output-dir": str(out),
        **extra,
    }


def assert_stopped(pids):
    """Every process in ``pids`` has exited (a zombie awaiting its parent counts)."""
    import os

    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        # a zombie awaiting reaping is stopped too; anything else is a leak
        with open(f"/proc/{pid}/stat") as fh:
            assert fh.read().split()[2] == "Z", f"process {pid} still running"
