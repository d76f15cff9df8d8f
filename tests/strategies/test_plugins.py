"""Plugins: scaffold, conformance kit, entry points, and docs/plugins.md kept in sync."""

from __future__ import annotations

import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from fedlora.config import ConfigError
from fedlora.run import registry
from fedlora.run.cli import build_parser
from fedlora.run.cli import main as cli_main
from fedlora.strategies.conformance import assert_conforms

ROOT = Path(__file__).resolve().parents[2]


def _pip_target(package: Path, target: Path) -> None:
    """Install ``package`` into ``target`` without touching the venv (offline build)."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(package),
        ],
        check=True,
    )


@pytest.fixture
def on_path(monkeypatch):
    """Put a folder on sys.path so that its dist-info entry points are discovered."""

    def add(folder: Path) -> None:
        monkeypatch.syspath_prepend(str(folder))
        importlib.invalidate_caches()

    return add


def _doc_commands() -> list[list[str]]:
    text = (ROOT / "docs" / "plugins.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            words = shlex.split(line)
            words = [w for w in words if "=" not in w or not w.split("=")[0].isupper()]
            if words and words[0] == "fedlora":
                commands.append(words[1:])
    return commands


def test_every_fedlora_command_in_the_doc_parses():
    commands = _doc_commands()
    assert {c[0] for c in commands} >= {"new-strategy", "check-strategy", "strategies", "simulate"}
    for argv in commands:
        build_parser().parse_args(argv)


def test_the_doc_walkthrough(tmp_path, on_path, capsys):
    """new-strategy -> check by import path -> install -> listed -> check by name."""
    assert cli_main(["new-strategy", "my_avg", "--dir", str(tmp_path / "plugins")]) == 0
    package = tmp_path / "plugins" / "fedlora-my-avg"
    assert (package / "fedlora_my_avg" / "strategy.py").is_file()

    on_path(package)
    assert cli_main(["check-strategy", "fedlora_my_avg.strategy:MyAvg"]) == 0
    assert "13 passed, 0 failed" in capsys.readouterr().out

    target = tmp_path / "site"
    _pip_target(package, target)
    on_path(target)
    assert registry.available()["my_avg"].source == "fedlora-my-avg"
    assert cli_main(["strategies"]) == 0
    assert "my_avg" in capsys.readouterr().out
    assert cli_main(["check-strategy", "my_avg"]) == 0
    assert cli_main(["new-strategy", "my_avg", "--dir", str(tmp_path / "plugins")]) == 2


def _installed(site: Path, package: str, entry_point: str) -> Path:
    """A dist-info for ``fedlora-<package>`` registering one strategy entry point."""
    dist = site / f"fedlora_{package}-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: fedlora-{package}\nVersion: 0.1\n"
    )
    (dist / "entry_points.txt").write_text(f"[fedlora.strategies]\n{entry_point}\n")
    return site


def test_broken_entry_point_names_package_and_error(tmp_path, on_path):
    on_path(_installed(tmp_path / "site", "broken", "broken = no_such_module:Thing"))
    with pytest.raises(
        ConfigError, match=r"'broken' \(fedlora-broken\) cannot be imported.*No module named"
    ):
        registry.load_strategy_class("broken")


def test_a_plugin_under_a_builtins_name_is_ignored_with_a_warning(tmp_path, on_path):
    on_path(_installed(tmp_path / "site", "copycat", "fedavg = copycat:FedAvg"))
    with pytest.warns(UserWarning, match=r"'copycat:FedAvg' registers the name 'fedavg'.*built-in"):
        entry = registry.available()["fedavg"]
    assert entry.source == "built-in"


def test_example_plugin_installs_and_runs_two_rounds(tiny_model, tmp_path, on_path):
    from flwr.simulation import run_simulation

    from fedlora.clients.app import app as client_app
    from fedlora.run import results
    from fedlora.server.app import make_server_app

    target = tmp_path / "site"
    _pip_target(ROOT / "examples" / "fedlora-flexlora", target)
    on_path(target)
    entry = registry.available()["flexlora_example"]
    assert entry.source == "fedlora-flexlora"  # the plugin, not the built-in flexlora
    cls = registry.load_strategy_class("flexlora_example")
    assert cls.__module__ == "fedlora_flexlora.strategy"
    assert_conforms(cls)
    out = tmp_path / "run"
    run_simulation(
        make_server_app(
            {
                "strategy": "flexlora_example",
                "model": str(tiny_model),
                "num-server-rounds": 2,
                "clients-per-round": 2,
                "num-partitions": 3,
                "local-steps": 4,
                "max-seq-len": 32,
                "eval-examples": 100,
                "lora-rank": 8,
                "client-ranks": "2,4,8",
                "output-dir": str(out),
            }
        ),
        client_app,
        num_supernodes=3,
        backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}},
    )
    records = results.read_records(out)
    assert [r["round"] for r in records] == [0, 1, 2]
    assert all(r["num_ok"] == 2 and not r["skipped"] for r in records[1:])


def test_a_plugin_written_for_the_old_api_gets_a_message_naming_the_new_import(tmp_path, on_path):
    (tmp_path / "old_plugin.py").write_text(
        "from strategies.base import LoraStrategy\n\n\nclass Old(LoraStrategy):\n    pass\n"
    )
    on_path(tmp_path)
    with pytest.raises(ConfigError, match="fedlora.strategies.api") as info:
        registry.load_strategy_class("old_plugin:Old")
    assert "docs/plugins.md" in str(info.value)
