"""compare.py --tune: the choice is made on validation runs, the reported runs read test."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from fedlora.config import RunConfig
from fedlora.run import results

SPEC = importlib.util.spec_from_file_location(
    "compare", Path(__file__).resolve().parents[2] / "simulations" / "compare.py"
)
compare = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(compare)


def _fake_run(cell: Path, settings: dict, accuracy: float) -> None:
    cell.mkdir(parents=True, exist_ok=True)
    cfg = RunConfig.from_mapping(settings)
    (cell / "run_config.json").write_text(cfg.to_json())
    records = [{"round": 0, "eval_accuracy": 0.1}, {"round": 1, "eval_accuracy": accuracy}]
    results.write_records(cell, records)
    (cell / results.SUMMARY_FILE).write_text("done")


@pytest.fixture
def calls(monkeypatch):
    """run_cells replaced by a stand-in whose validation accuracy peaks at lr=0.003 for
    ffa_lora and at lr=0.001 for fedavg, whatever the seed."""
    made: list[tuple[str, dict]] = []
    peak = {"ffa_lora": 0.003, "fedavg": 0.001}

    def run_cells(scenarios, seeds, out, supernodes, extra):
        for scenario in scenarios:
            for seed in seeds:
                cell = out / scenario / f"seed-{seed}"
                if compare._done(cell, extra):
                    continue
                made.append((scenario, dict(extra)))
                score = 0.9 - abs(float(extra["lr"]) - peak[scenario]) * 100 + seed / 100
                _fake_run(cell, {**extra, "seed": seed}, score)

    monkeypatch.setattr(compare, "run_cells", run_cells)
    return made


def test_each_scenario_gets_its_best_validation_value_and_reports_on_test(tmp_path, calls):
    out = tmp_path / "cmp"
    code = compare.main(
        [
            "--scenarios",
            "fedavg",
            "ffa_lora",
            "--seeds",
            "0",
            "1",
            "--out",
            str(out),
            "--tune",
            "lr=0.001,0.003,0.01",
        ]
    )
    assert code == 0
    tuning = [(s, e) for s, e in calls if e.get("eval-split") == "validation"]
    reported = [(s, e) for s, e in calls if e.get("eval-split") == "test"]
    assert len(tuning) == 2 * 3 * 2 and len(reported) == 2 * 2
    assert all(e["validation-fraction"] == 0.1 for _, e in tuning + reported)
    assert {s: e["lr"] for s, e in reported} == {"fedavg": 0.001, "ffa_lora": 0.003}
    text = (out / "tuning.md").read_text()
    assert "| fedavg |" in text and "| ffa_lora |" in text and "test split is not read" in text
    assert text.splitlines()[-1].endswith("| 0.003 |")  # ffa_lora's choice
    assert "Tuned `lr`" in (out / "comparison.md").read_text()


def test_tune_seeds_tunes_on_fewer_seeds_than_the_report(tmp_path, calls):
    out = tmp_path / "cmp"
    args = ["--scenarios", "fedavg", "--seeds", "0", "1", "2", "--out", str(out)]
    compare.main([*args, "--tune", "lr=0.001,0.01", "--tune-seeds", "0"])
    tuning = [e for _, e in calls if e.get("eval-split") == "validation"]
    reported = [e for _, e in calls if e.get("eval-split") == "test"]
    assert len(tuning) == 2 and len(reported) == 3  # 2 candidates x seed 0; then 3 seeds
    assert not (out / "tuning" / "lr=0.001" / "fedavg" / "seed-1").exists()
    assert all(e["lr"] == 0.001 for e in reported)
    assert "seeds [0]" in (out / "tuning.md").read_text()


def test_a_cell_of_an_edited_scenario_file_is_not_taken_as_done(tmp_path):
    cell = tmp_path / "fedsa_lora" / "seed-0"
    _fake_run(cell, {"strategy": "fedsa_lora", "fraction-evaluate": 1.0, "seed": 0}, 0.5)
    scenario = compare.load_scenario("fedsa_lora")  # has since gained node-eval-fraction
    assert scenario["node-eval-fraction"] < 1.0
    assert not compare._done(cell, scenario)
    assert compare._done(cell, {"strategy": "fedsa_lora", "fraction-evaluate": 1.0})


def test_tune_seeds_without_tune_is_refused(tmp_path, calls):
    with pytest.raises(SystemExit):
        compare.main(["--scenarios", "fedavg", "--out", str(tmp_path), "--tune-seeds", "0"])
    assert calls == []


def test_a_finished_cell_of_another_setting_is_run_again(tmp_path, calls):
    out = tmp_path / "cmp"
    _fake_run(out / "fedavg" / "seed-0", {"lr": 0.5, "seed": 0}, 0.3)  # an untuned earlier run
    compare.main(
        ["--scenarios", "fedavg", "--seeds", "0", "--out", str(out), "--tune", "lr=0.001,0.01"]
    )
    ran = json.loads((out / "fedavg" / "seed-0" / "run_config.json").read_text())
    assert ran["lr"] == 0.001 and ran["eval-split"] == "test"


@pytest.mark.parametrize("bad", ["lr=0.001", "lr=", "=1,2", "lr=0.001,-1"])
def test_a_bad_tune_fails_before_any_run(tmp_path, calls, bad):
    with pytest.raises(SystemExit if "-1" not in bad else Exception):
        compare.main(["--scenarios", "fedavg", "--out", str(tmp_path), "--tune", bad])
    assert calls == []


def test_the_table_states_each_budget_and_the_paired_table_its_spread(tmp_path):
    """The step budget, lr and alpha come from each cell's own record; the spread of the
    paired differences is their sample standard deviation (numpy, by hand)."""
    out = tmp_path / "cmp"
    finals = {"fedavg": [0.60, 0.58, 0.57], "ffa_lora": [0.50, 0.45, 0.47]}
    for name, accs in finals.items():
        for seed, acc in enumerate(accs):
            settings = {"seed": seed, "local-steps": 7, "num-server-rounds": 1}
            if name == "ffa_lora":
                settings |= {"strategy": "ffa_lora", "lora-alpha": 128, "lr": 0.01}
            _fake_run(out / name / f"seed-{seed}", settings, acc)
    older = out / "fedavg" / "seed-2" / "run_config.json"  # before grad-accumulation existed
    config = json.loads(older.read_text())
    del config["grad-accumulation"]
    older.write_text(json.dumps(config))
    data = compare.collect(list(finals), [0, 1, 2], out)
    rows = {r.split(" | ")[0]: r for r in compare.table(data, out, [0, 1, 2]).splitlines()}
    assert "| 1x4x7 of 16, lr 0.003, alpha 16 |" in rows["| fedavg"]
    assert "| 1x4x7 of 16, lr 0.01, alpha 128 |" in rows["| ffa_lora"]
    paired = compare.paired_table(list(finals), out, [0, 1, 2], "ffa_lora")
    row = next(r for r in paired.splitlines() if r.startswith("| fedavg |"))
    diffs = [a - b for a, b in zip(finals["fedavg"], finals["ffa_lora"], strict=True)]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == " / ".join(f"{d:+.3f}" for d in diffs)
    assert cells[3] == f"{sum(diffs) / 3:+.3f}"
    mean = sum(diffs) / 3
    assert cells[4] == f"{(sum((d - mean) ** 2 for d in diffs) / 2) ** 0.5:.3f}"
