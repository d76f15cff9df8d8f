"""Invalid configuration fails before any training, naming the key and the value."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from fedlora.config import ConfigError, NodeConfig, RunConfig
from fedlora.config.settings import parse_settings
from fedlora.data.tables import load_table, partition
from fedlora.lora.spec import LoraSpec
from fedlora.model.models import build_lora_model
from fedlora.run.cli import load_scenario
from fedlora.run.cli import main as cli_main
from fedlora.run.local_run import fit_to_nodes
from fedlora.server.federation import build_strategy, check_partitions

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_defaults_match_runconfig():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert declared == RunConfig().to_mapping()


def test_round_trip_through_mapping():
    cfg = RunConfig.from_mapping({"lora-rank": 16, "lr": "0.01", "use-rslora": "true"})
    assert (cfg.lora_rank, cfg.lr, cfg.use_rslora) == (16, 0.01, True)
    assert RunConfig.from_mapping(cfg.to_mapping()) == cfg


@pytest.mark.parametrize(
    "overrides, key, value",
    [
        ({"lora-rank": 0}, "lora-rank", "0"),
        ({"lora-rank": -3}, "lora-rank", "-3"),
        ({"lr": 0.0}, "lr", "0.0"),
        ({"lr": -1e-3}, "lr", "-0.001"),
        ({"dirichlet-alpha": 0}, "dirichlet-alpha", "0"),
        ({"dirichlet-alpha": -0.5}, "dirichlet-alpha", "-0.5"),
        ({"num-server-rounds": 0}, "num-server-rounds", "0"),
        ({"partitioner": "random"}, "partitioner", "'random'"),
        ({"min-replies": 5, "clients-per-round": 3}, "min-replies", "5"),
        ({"lora-rank": "eight"}, "lora-rank", "'eight'"),
        ({"lora-rank": 2.5}, "lora-rank", "2.5"),
        ({"partitioner": "natural"}, "partition-column", "''"),
    ],
)
def test_bad_values_name_key_and_value(overrides, key, value):
    with pytest.raises(ConfigError) as info:
        RunConfig.from_mapping(overrides)
    assert f"'{key}'" in str(info.value) and value in str(info.value)


def test_unknown_key_lists_known_keys():
    with pytest.raises(ConfigError, match="Unknown run-config key 'lora-rnak'.*lora-rank"):
        RunConfig.from_mapping({"lora-rnak": 8})


def test_unknown_strategy_lists_known_ones():
    with pytest.raises(ConfigError, match="'strategy': 'fedprox' is not a known strategy.*fedavg"):
        build_strategy(RunConfig(strategy="fedprox"))


def test_unimportable_strategy_path_names_module():
    with pytest.raises(ConfigError, match="cannot be imported from 'no_such_pkg.mod'"):
        build_strategy(RunConfig(strategy="no_such_pkg.mod:Thing"))


def test_unknown_model_names_the_value(tmp_path):
    with pytest.raises(ConfigError, match="'model': .*no config.json"):
        build_lora_model(str(tmp_path), 20, LoraSpec(8, 16.0, ("query",)), 0)


def test_bad_target_modules_named(tiny_model):
    with pytest.raises(ConfigError, match="'lora-targets': 'nonexistent'"):
        build_lora_model(str(tiny_model), 20, LoraSpec(8, 16.0, ("nonexistent",)), 0)


def test_more_partitions_than_examples(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\n" + "".join(f"t{i},{i % 2}\n" for i in range(10)))
    cfg = RunConfig(dataset=str(path), num_partitions=50, partitioner="iid")
    with pytest.raises(ConfigError, match="'num-partitions': 50 exceeds the 8 training examples"):
        check_partitions(cfg, load_table(cfg.data))


def test_held_out_rows_too_few_for_the_partitions_are_named(tmp_path):
    """40 rows: 32 train and 8 held out; 10 nodes can split the first, not the second, and
    every node partitions both, so the run is refused before it starts."""
    path = tmp_path / "d.csv"
    path.write_text("text,label\n" + "".join(f"t{i},{i % 2}\n" for i in range(40)))
    cfg = RunConfig(dataset=str(path), num_partitions=10, partitioner="iid")
    with pytest.raises(ConfigError, match=r"10 exceeds the 8 held-out \(test\) examples"):
        check_partitions(cfg, load_table(cfg.data))


def test_missing_column_named(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("body,label\nhello,1\n")
    with pytest.raises(ConfigError, match="'text-column': 'text' is not a column"):
        load_table(RunConfig(dataset=str(path)).data)


def test_node_config_errors():
    with pytest.raises(ConfigError, match="'partition-id': 5"):
        NodeConfig.from_mapping({"partition-id": 5, "num-partitions": 2})
    with pytest.raises(
        ConfigError, match=r"'data-path': '/missing.csv' file \(or dataset folder\) does not exist"
    ):
        NodeConfig.from_mapping({"data-path": "/missing.csv"})
    with pytest.raises(ConfigError, match="Unknown node-config key 'partition'"):
        NodeConfig.from_mapping({"partition": 1})
    with pytest.raises(ConfigError, match="needs either 'partition-id'"):
        NodeConfig.from_mapping({})


def test_a_missing_dataset_file_is_refused_by_the_cli_not_by_the_config(capsys):
    RunConfig(dataset="/no/such/file.csv")  # a node that never reads it must not fail on it
    assert cli_main(["simulate", "-c", "dataset=/no/such/file.csv"]) == 2
    assert "'dataset': '/no/such/file.csv' is neither a file" in capsys.readouterr().err


def test_cli_reports_bad_config_before_starting_anything(capsys):
    assert cli_main(["simulate", "-c", "lora-rank=0"]) == 2
    assert "'lora-rank': 0 must be > 0" in capsys.readouterr().err


def test_natural_partition_count_must_match(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label,site\n" + "".join(f"t{i},{i % 2},s{i % 3}\n" for i in range(30)))
    cfg = RunConfig(
        dataset=str(path), partitioner="natural", partition_column="site", num_partitions=4
    )
    with pytest.raises(ConfigError, match="'num-partitions': 4, but column 'site' has 3"):
        partition(load_table(cfg.data).train, cfg.data, 0, 4)


def test_configuration_doc_is_in_sync():
    from fedlora.config import markdown_reference

    assert (ROOT / "docs" / "configuration.md").read_text() == markdown_reference(), (
        "docs/configuration.md is stale: run `make docs`"
    )


def test_strategy_options_reach_the_strategy_and_are_checked():
    strategy = build_strategy(RunConfig(strategy="lora_fair", strategy_options="fair-lambda=0.5"))
    assert strategy.lam == 0.5
    with pytest.raises(ConfigError, match="'fair-method': 'svd'"):
        build_strategy(RunConfig(strategy="lora_fair", strategy_options="fair-method=svd"))
    with pytest.raises(ConfigError, match="'strategy-options': 'oops' must be key=value"):
        RunConfig(strategy_options="oops")


def test_client_ranks_are_checked():
    with pytest.raises(
        ConfigError, match=r"'client-ranks': '4,16' must hold ranks in \[1, lora-rank=8\]"
    ):
        RunConfig(client_ranks="4,16")
    with pytest.raises(ConfigError, match="'client-ranks': '4,x' is not a comma-separated"):
        RunConfig(client_ranks="4,x")
    with pytest.raises(ConfigError, match="does not support heterogeneous ranks"):
        build_strategy(RunConfig(strategy="lora_fair", lora_rank=16, client_ranks="4,8,16"))
    assert RunConfig(lora_rank=16, client_ranks="4,8,16").rank_of_partition(4) == 8


def test_every_scenario_is_a_valid_run_config():
    scenarios = sorted((ROOT / "simulations" / "scenarios").glob("*.toml"))
    assert len(scenarios) >= 7
    for path in scenarios:
        cfg = RunConfig.from_mapping(load_scenario(str(path), path.parent))
        build_strategy(cfg)  # the strategy accepts the scenario's ranks and options


def test_scenario_extends_another_and_cycles_are_named(tmp_path):
    (tmp_path / "base.toml").write_text('task = "causal-lm"\nlr = 0.1\n')
    (tmp_path / "variant.toml").write_text('extends = "base"\nlr = 0.2\n')
    assert load_scenario("variant", tmp_path) == {"task": "causal-lm", "lr": 0.2}
    (tmp_path / "loop.toml").write_text('extends = "loop"\n')
    with pytest.raises(ConfigError, match="'extends': 'loop' extends itself"):
        load_scenario("loop", tmp_path)
    with pytest.raises(ConfigError, match="'scenario': 'nope' is neither a file nor one of"):
        load_scenario("nope", tmp_path)


def test_node_partition_outside_the_run_fails_when_the_node_describes_itself():
    from tests.helpers import make_job

    job = make_job(RunConfig(num_partitions=3), {"partition-id": 7})
    with pytest.raises(ConfigError, match="'partition-id': 7 not in \\[0, 3\\)"):
        job.node_info()
    assert (
        make_job(RunConfig(num_partitions=3), {"partition-id": 2}).node_info()["partition-id"] == 2
    )


@pytest.mark.parametrize(
    "key",
    [
        f.name.replace("_", "-")
        for f in __import__("dataclasses").fields(RunConfig)
        if f.type == "float"
    ],
)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "-inf"], ids=["nan", "inf", "-inf"])
def test_no_float_key_accepts_a_non_finite_value(key, bad):
    """NaN slipped through every comparison (dp-noise=nan hung a round for 11 minutes) and
    inf through most (lr=inf ran with every client failing)."""
    with pytest.raises(ConfigError, match=f"'{key}'.*finite"):
        RunConfig.from_mapping({key: bad})


def test_a_typo_suggests_the_key_instead_of_listing_all():
    with pytest.raises(ConfigError) as info:
        RunConfig.from_mapping({"lora-rnak": 8})
    text = str(info.value)
    assert "did you mean 'lora-rank'" in text and "weighting" not in text


def test_simulate_refuses_more_clients_per_round_than_supernodes(capsys):
    assert cli_main(["simulate", "--supernodes", "3", "-c", "clients-per-round=5"]) == 2
    assert "'clients-per-round': 5 exceeds --supernodes 3" in capsys.readouterr().err


def test_simulate_clamps_the_defaults_to_a_small_federation():
    overrides, notes = fit_to_nodes({}, 2)
    assert overrides == {"clients-per-round": 2} and "clients-per-round" in notes[0]
    assert fit_to_nodes({}, 1)[0] == {"clients-per-round": 1, "min-replies": 1}
    assert fit_to_nodes({"min-replies": 1}, 3)[0] == {"min-replies": 1, "clients-per-round": 3}
    assert fit_to_nodes({}, 10) == ({}, [])


def test_unknown_strategy_options_are_refused_with_a_suggestion():
    with pytest.raises(ConfigError, match="'fair-lamda'.*did you mean 'fair-lambda'"):
        build_strategy(RunConfig(strategy="lora_fair", strategy_options="fair-lamda=0.5"))
    with pytest.raises(ConfigError, match="'bogus'.*'fedavg' takes no options"):
        build_strategy(RunConfig(strategy="fedavg", strategy_options="bogus=1"))
    with pytest.raises(ConfigError, match="'flora-catch-up': 'maybe' is not a valid bool"):
        build_strategy(RunConfig(strategy="flora", strategy_options="flora-catch-up=maybe"))
    assert (
        build_strategy(
            RunConfig(strategy="flora", strategy_options="flora-catch-up=false")
        ).ledger.catch_up
        is False
    )


def test_a_rank_larger_than_the_model_is_refused_before_anything_starts(capsys):
    assert cli_main(["simulate", "-c", "lora-rank=1000"]) == 2
    err = capsys.readouterr().err
    assert "'lora-rank': 1000 exceeds 384" in err and "query" in err


def test_cli_refuses_a_bad_strategy_option_before_starting_anything(capsys):
    assert (
        cli_main(
            ["simulate", "-c", "strategy=lora_fair", "-c", "strategy-options=fair-methd=cosine"]
        )
        == 2
    )
    assert "did you mean 'fair-method'" in capsys.readouterr().err


def test_fit_to_nodes_names_a_count_that_is_not_a_number():
    with pytest.raises(ConfigError, match="'clients-per-round': 'abc' is not a valid int"):
        fit_to_nodes({"clients-per-round": "abc"}, 3)
    with pytest.raises(ConfigError, match="'min-replies': nan"):
        fit_to_nodes({"min-replies": float("nan")}, 3)


def test_settings_declared_without_string_annotations_are_coerced():
    """A plugin module without ``from __future__ import annotations`` has type objects."""
    settings = dataclasses.make_dataclass(
        "Settings",
        [
            ("steps", int, dataclasses.field(default=1)),
            ("scale", float, dataclasses.field(default=0.5)),
            ("enabled", bool, dataclasses.field(default=False)),
            ("limit", int | None, dataclasses.field(default=None)),
            ("name", str, dataclasses.field(default="a")),
        ],
    )
    parsed = parse_settings(
        settings,
        {"steps": "3", "scale": "0.25", "enabled": "true", "limit": "none", "name": "b"},
        "plugin",
    )
    assert (parsed.steps, parsed.scale, parsed.enabled, parsed.limit, parsed.name) == (
        3,
        0.25,
        True,
        None,
        "b",
    )
    assert parse_settings(settings, {"limit": "7"}, "plugin").limit == 7
    with pytest.raises(ConfigError, match="'steps': 'abc' is not a valid int"):
        parse_settings(settings, {"steps": "abc"}, "plugin")
    with pytest.raises(ConfigError, match="'enabled': 'maybe' is not a valid bool"):
        parse_settings(settings, {"enabled": "maybe"}, "plugin")
