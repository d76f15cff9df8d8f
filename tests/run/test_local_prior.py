"""simulations/local_prior.py: the label-mix floor of a personalised evaluation."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest

from fedlora.config import RunConfig

SPEC = importlib.util.spec_from_file_location(
    "local_prior", Path(__file__).resolve().parents[2] / "simulations" / "local_prior.py"
)
local_prior = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(local_prior)


def test_one_label_per_node_is_all_prior_and_iid_is_about_chance():
    with warnings.catch_warnings():  # flwr-datasets: some classes unused at 1 per node
        warnings.simplefilter("ignore", UserWarning)
        one_label = RunConfig(partitioner="pathological", classes_per_partition=1)
        assert local_prior.local_prior_accuracy(one_label) == 1.0
    iid = local_prior.local_prior_accuracy(RunConfig(partitioner="iid"))
    skewed = local_prior.local_prior_accuracy(RunConfig())  # Dirichlet 0.5
    assert iid == pytest.approx(1 / 20, abs=0.02)  # 20 near-balanced labels
    assert iid < skewed < 1.0
