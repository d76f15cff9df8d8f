"""validation-fraction and eval-split: rows held out before partitioning, test never read."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd
import pytest

from fedlora.config import ConfigError, RunConfig
from fedlora.data.tables import (
    TextTable,
    evaluation_rows,
    hold_out_validation,
    load_table,
    partition,
)


def _table(n_train: int = 50, n_test: int = 10) -> TextTable:
    train = pd.DataFrame(
        {"text": [f"train {i}" for i in range(n_train)], "label": [i % 3 for i in range(n_train)]}
    )
    test = pd.DataFrame(
        {"text": [f"test {i}" for i in range(n_test)], "label": [i % 3 for i in range(n_test)]}
    )
    return TextTable(train, test, ("a", "b", "c"))


def test_the_held_out_rows_leave_training_and_nothing_else_moves():
    table = _table()
    split = hold_out_validation(table, 0.2, seed=3)
    assert len(split.validation) == 10 and len(split.train) == 40
    assert set(split.validation.text).isdisjoint(split.train.text)
    assert set(split.validation.text) | set(split.train.text) == set(table.train.text)
    pd.testing.assert_frame_equal(split.test, table.test)  # the test split is untouched
    again = hold_out_validation(table, 0.2, seed=3)
    pd.testing.assert_frame_equal(again.validation, split.validation)  # same seed, same rows
    other = hold_out_validation(table, 0.2, seed=4)
    assert set(other.validation.text) != set(split.validation.text)


def test_no_fraction_is_the_table_as_it_was():
    table = _table()
    assert hold_out_validation(table, 0.0, seed=0) is table
    assert evaluation_rows(table, "test") is table.test
    with pytest.raises(ConfigError, match="'eval-split'"):
        evaluation_rows(table, "validation")


def test_eval_split_picks_the_rows():
    split = hold_out_validation(_table(), 0.1, seed=0)
    assert evaluation_rows(split, "validation") is split.validation
    assert evaluation_rows(split, "test") is split.test


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"validation-fraction": 0.5}, "'validation-fraction'"),
        ({"validation-fraction": -0.1}, "'validation-fraction'"),
        ({"eval-split": "validation"}, "needs validation-fraction > 0"),
        ({"eval-split": "train"}, "'eval-split'"),
    ],
)
def test_bad_settings_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_mapping(overrides)


def test_no_client_partition_holds_a_validation_row():
    cfg = RunConfig.from_mapping({"validation-fraction": 0.1, "eval-split": "validation"})
    table = load_table(cfg.data)
    plain = load_table(RunConfig().data)
    assert len(table.train) + len(table.validation) == len(plain.train)
    pd.testing.assert_frame_equal(table.test, plain.test)
    held = set(table.validation.text)
    rows = [
        partition(table.train, cfg.data, pid, cfg.num_partitions)
        for pid in range(cfg.num_partitions)
    ]
    # every training row is in exactly one place, a partition or validation (counted as a
    # multiset: the dataset holds a few identical texts)
    placed = Counter(t for r in rows for t in r.text) + Counter(table.validation.text)
    assert placed == Counter(plain.train.text)
    # the server's evaluation rows in a tuning run are validation rows, not test rows
    assert set(evaluation_rows(table, cfg.eval_split).text) == held
    assert np.isin(table.validation.label.unique(), np.arange(table.num_labels)).all()
