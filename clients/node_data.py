"""A node's own data: its partition of the run's dataset, or its own file, tokenised once.

A node with ``data-path`` in its node config reads only that file (it never needs the
server's dataset, which may not exist where it runs); any other node derives its
partition of the run's dataset exactly as every other process does. Both are tokenised
once per process and cached on disk (:mod:`fedlora.clients.data_cache`), so a fresh
ClientApp process in deployment skips the work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import transformers
from torch.utils.data import TensorDataset

from fedlora.clients.data_cache import cache_dir, cache_key, file_stamp, load_or_build
from fedlora.config import CAUSAL_LM, ConfigError, NodeConfig, RunConfig
from fedlora.data.files import read_frame
from fedlora.data.instruct import is_labelled_only, questions_from_labels, read_instruction_file
from fedlora.data.tables import (
    TEST_FRACTION,
    encode_labels,
    eval_subset,
    evaluation_rows,
    load_table,
    partition,
    read_user_file,
    tokenize,
)
from fedlora.model.models import load_tokenizer

DATA_FORMAT = 2
"""Bump when tokenisation or partitioning changes, so cached data from older code is not
reused (2: the size-based partitioners, "iid" among them, shuffle before slicing)."""

Splits = tuple[TensorDataset, TensorDataset]
MAX_CACHED_SPLITS = 64
"""Partitions a process keeps tokenised (a simulated client serves several; oldest goes)."""
_DATA_CACHE: dict[tuple[Any, ...], Splits] = {}


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


def node_data(cfg: RunConfig, node: NodeConfig, label_names: tuple[str, ...]) -> Splits:
    """This node's (train, held-out) tokenised data, cached per process and on disk."""
    key = (
        cfg.task,
        cfg.prompt_column,
        cfg.response_column,
        cfg.dataset,
        cfg.text_column,
        cfg.label_column,
        cfg.partitioner,
        cfg.dirichlet_alpha,
        cfg.classes_per_partition,
        cfg.partition_column,
        cfg.seed,
        cfg.validation_fraction,
        cfg.eval_split,
        cfg.node_eval_fraction,
        cfg.model,
        cfg.max_seq_len,
        node.partition_id,
        node.num_partitions or cfg.num_partitions,
        node.data_path,
        label_names,
    )
    dataset = None if node.data_path is not None else cfg.dataset  # what it reads
    # an edited file makes a new key, in memory (a warm worker) as on disk
    stamps = (file_stamp(node.data_path), file_stamp(dataset), file_stamp(cfg.model))
    key = (*key, *stamps)
    if key not in _DATA_CACHE:

        def build() -> Splits:
            train_frame, test_frame = frames(cfg, node, label_names)
            test_frame = evaluation_share(test_frame, cfg, node)
            tokenizer = load_tokenizer(cfg.model, cfg.task)
            return (
                tokenize(train_frame, tokenizer, cfg.max_seq_len, cfg.task),
                tokenize(test_frame, tokenizer, cfg.max_seq_len, cfg.task),
            )

        # a fresh process (deployment) finds the tokenised data on disk
        folder = cache_dir(node_state_dir(cfg, node))
        stamped = (*key, transformers.__version__, DATA_FORMAT)
        if len(_DATA_CACHE) >= MAX_CACHED_SPLITS:  # a warm worker serving many runs
            del _DATA_CACHE[next(iter(_DATA_CACHE))]
        _DATA_CACHE[key] = load_or_build(folder, cache_key(stamped), build)
    return _DATA_CACHE[key]


def evaluation_share(frame: pd.DataFrame, cfg: RunConfig, node: NodeConfig) -> pd.DataFrame:
    """The rows of ``frame`` the node evaluates on: a fixed ``node-eval-fraction`` of them.

    Seeded by the run's seed and the node's partition, so nodes of equal share sizes do
    not all pick the same positions, and every process of one node picks the same rows.
    """
    if cfg.node_eval_fraction >= 1.0:
        return frame
    n = max(1, round(cfg.node_eval_fraction * len(frame)))
    return eval_subset(frame, n, (cfg.seed, int(node.partition_id or 0)))


def frames(
    cfg: RunConfig, node: NodeConfig, label_names: tuple[str, ...]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The node's (train, held-out) rows, before tokenisation."""
    if node.data_path is not None:
        frame = own_file(cfg, Path(node.data_path), label_names)
        order = np.random.default_rng(cfg.seed).permutation(len(frame))
        n_test = round(TEST_FRACTION * len(frame)) if len(frame) >= 5 else 0
        test, train = frame.iloc[order[:n_test]], frame.iloc[order[n_test:]]
        return train.reset_index(drop=True), test.reset_index(drop=True)
    table = load_table(cfg.data)
    num = node.num_partitions or cfg.num_partitions
    pid = int(node.partition_id or 0)
    held_out = evaluation_rows(table, cfg.eval_split)  # tuning on validation never reads test
    return (
        partition(table.train, cfg.data, pid, num),
        partition(held_out, cfg.data, pid, num, split=f"held-out ({cfg.eval_split})"),
    )


def own_file(cfg: RunConfig, path: Path, label_names: tuple[str, ...]) -> pd.DataFrame:
    """This node's own data file: labelled rows, or (causal-lm) prompts and responses.

    A labelled file on the causal-lm path becomes questions whose answer is the label,
    as the server's own labelled data does.
    """
    columns = set(read_frame(path).columns)
    labelled = is_labelled_only(columns, cfg.text_column, cfg.label_column, cfg.prompt_column)
    if cfg.task == CAUSAL_LM and not labelled:
        return read_instruction_file(path, cfg.prompt_column, cfg.response_column)
    if not label_names:
        raise ConfigError("The server sent no label names for a node with data-path")
    frame = read_user_file(path, cfg.text_column, cfg.label_column)
    frame = encode_labels(frame, label_names, source=f"data-path {path}")
    if cfg.task == CAUSAL_LM:
        frame = questions_from_labels(frame, label_names, str(path))
    return frame
