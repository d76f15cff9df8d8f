"""The on-disk cache of a node's tokenised data: reused by a fresh process, never trusted."""

from __future__ import annotations

import logging
from collections import Counter

import pytest
import torch
from torch.utils.data import TensorDataset

from fedlora.clients.data_cache import cache_dir, cache_key, file_stamp, load_or_build


def _splits(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(seed)

    def one(n: int) -> TensorDataset:
        ids = torch.randint(0, 1000, (n, 8), generator=g)
        return TensorDataset(ids, torch.ones_like(ids), torch.randint(0, 5, (n,), generator=g))

    return one(12), one(3)


def _equal(a: tuple[TensorDataset, ...], b: tuple[TensorDataset, ...]) -> bool:
    return all(
        torch.equal(x, y)
        for da, db in zip(a, b, strict=True)
        for x, y in zip(da.tensors, db.tensors, strict=True)
    )


def test_second_load_reads_the_file_instead_of_building(tmp_path):
    calls = []

    def build():
        calls.append(1)
        return _splits()

    first = load_or_build(tmp_path, "k", build)
    second = load_or_build(tmp_path, "k", lambda: pytest.fail("rebuilt despite the cache"))
    assert len(calls) == 1
    assert _equal(first, second)
    assert (tmp_path / "k.safetensors").is_file()
    assert not list(tmp_path.glob(".tmp-*"))  # the atomic write left nothing behind


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong-shapes"])
def test_a_damaged_file_is_rebuilt_with_a_warning(tmp_path, caplog, damage):
    load_or_build(tmp_path, "k", _splits)
    path = tmp_path / "k.safetensors"
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:50])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 200)
    else:  # a valid safetensors file whose tensors disagree
        from safetensors.torch import save_file

        bad = {}
        for split in ("train", "test"):
            bad[f"{split}.input_ids"] = torch.zeros(3, 8, dtype=torch.long)
            bad[f"{split}.attention_mask"] = torch.zeros(3, 8, dtype=torch.long)
            bad[f"{split}.labels"] = torch.zeros(4, dtype=torch.long)  # one label too many
        save_file(bad, str(path))
    with caplog.at_level(logging.WARNING):
        got = load_or_build(tmp_path, "k", lambda: _splits(1))
    assert _equal(got, _splits(1))
    assert "unreadable" in caplog.text and str(path) in caplog.text
    assert _equal(load_or_build(tmp_path, "k", lambda: pytest.fail("not rewritten")), _splits(1))


def test_location_and_off_switch(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLORA_CACHE_DIR", "off")
    assert cache_dir("/some/state") is None
    assert _equal(load_or_build(None, "k", _splits), _splits())
    monkeypatch.delenv("FEDLORA_CACHE_DIR")
    assert cache_dir(str(tmp_path)) == tmp_path / "data-cache"
    monkeypatch.setenv("FEDLORA_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir(None) == tmp_path / "c"


def test_key_changes_with_what_shapes_the_data(tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("text,label\na,x\n")
    before = cache_key(("m", 64, file_stamp(str(data))))
    data.write_text("text,label\na,x\nb,y\n")
    assert cache_key(("m", 64, file_stamp(str(data)))) != before
    assert cache_key(("m", 64)) != cache_key(("m", 128))
    assert cache_key(("m", 64)) == cache_key(("m", 64))


def test_a_fresh_process_reads_its_partition_from_the_cache(tiny_model, tmp_path, monkeypatch):
    """What a new ClientApp process does in deployment: no re-partitioning, same data."""
    from fedlora.clients import node_data
    from fedlora.config import RunConfig
    from tests.helpers import make_job

    monkeypatch.setenv("FEDLORA_CACHE_DIR", str(tmp_path))
    cfg = RunConfig(model=str(tiny_model), num_partitions=4)
    job = make_job(cfg, {"partition-id": 1, "num-partitions": 4})
    monkeypatch.setattr(node_data, "_DATA_CACHE", {})
    first = job.data()
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    monkeypatch.setattr(node_data, "_DATA_CACHE", {})  # a new process: nothing in memory

    def no_partitioning(*args):
        raise AssertionError("the partition was rebuilt although it is cached")

    monkeypatch.setattr(node_data, "frames", no_partitioning)
    assert _equal(job.data(), first)


def test_node_eval_fraction_takes_a_fixed_random_share_of_held_out_rows_only(
    tiny_model, tmp_path, monkeypatch
):
    """Federated evaluation on a seeded share of each node's held-out rows; training
    rows unchanged; the same rows in a fresh process; a data-path node's file likewise."""
    from fedlora.clients import node_data
    from fedlora.config import RunConfig
    from tests.helpers import make_job

    def fresh_data(cfg, node):
        monkeypatch.setattr(node_data, "_DATA_CACHE", {})  # a new process
        monkeypatch.setenv("FEDLORA_CACHE_DIR", "off")  # and no disk cache either
        return make_job(cfg, node).data()

    def rows(data):
        return [tuple(r.tolist()) for r in data.tensors[0]]

    node = {"partition-id": 1, "num-partitions": 4}
    settings = {"model": str(tiny_model), "fraction_evaluate": 1.0}
    whole_train, whole_test = fresh_data(RunConfig(**settings), node)
    cfg = RunConfig(**settings, node_eval_fraction=0.25)
    train, test = fresh_data(cfg, node)
    assert len(test) == round(0.25 * len(whole_test)) and len(whole_test) >= 8
    assert _equal((train,), (whole_train,))
    own = rows(whole_test)
    assert not Counter(rows(test)) - Counter(own)  # each one of this node's own rows ...
    assert rows(test) != own[: len(test)]  # ... a random share, not the first n
    assert _equal(fresh_data(cfg, node), (train, test))  # the same rows again
    other = fresh_data(cfg, {"partition-id": 2, "num-partitions": 4})[1]
    assert Counter(rows(other)) - Counter(own)  # another node evaluates on its own rows

    # a node with its own file: the share is of that file's held-out 20%
    path = tmp_path / "own.csv"
    path.write_text("text,label\n" + "".join(f"doc number {i},{'ab'[i % 2]}\n" for i in range(200)))
    own_node = {"data-path": str(path)}
    labels = {"label_names": ("a", "b")}
    full = make_job(RunConfig(**settings), own_node, **labels)
    monkeypatch.setattr(node_data, "_DATA_CACHE", {})
    assert len(full.data()[1]) == 40
    capped = make_job(cfg, own_node, **labels)
    monkeypatch.setattr(node_data, "_DATA_CACHE", {})
    assert len(capped.data()[1]) == 10


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"node_eval_fraction": 0.0, "fraction_evaluate": 1.0},
            r"node-eval-fraction.*0\.0.*\(0, 1\]",
        ),
        ({"node_eval_fraction": 1.5, "fraction_evaluate": 1.0}, r"node-eval-fraction.*1\.5"),
        ({"node_eval_fraction": 0.5}, r"node-eval-fraction.*0\.5.*fraction-evaluate = 0"),
    ],
)
def test_a_bad_node_eval_fraction_names_itself(settings, message):
    from fedlora.config import ConfigError, RunConfig

    with pytest.raises(ConfigError, match=message):
        RunConfig(**settings)
