"""What a newcomer meets first: errors before any process, a repeatable run, a readable log."""

from __future__ import annotations

import pytest

from fedlora.config import RunConfig
from fedlora.run import results
from fedlora.run.cli import main as cli_main
from fedlora.run.local_run import set_aside_previous_run


def _refused(capsys, *args: str) -> str:
    assert cli_main(["simulate", *args]) == 2
    return capsys.readouterr().err


def test_an_output_dir_under_a_file_is_named_before_anything_starts(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    err = _refused(capsys, "--output-dir", str(blocker / "run"))
    assert "'output-dir'" in err and "is a file" in err and "Errno" not in err


def test_a_sequence_longer_than_the_model_is_named(capsys):
    err = _refused(capsys, "-c", "max-seq-len=100000")
    assert "'max-seq-len': 100000 exceeds the model's 512 positions" in err


def test_a_missing_column_of_a_data_file_is_named_before_anything_starts(tmp_path, capsys):
    data = tmp_path / "tickets.csv"
    data.write_text("body,queue\n" + "".join(f"t{i},{'ab'[i % 2]}\n" for i in range(20)))
    err = _refused(capsys, "-c", f"dataset={data}", "-c", "text-column=text")
    assert "'text'" in err and "Traceback" not in err


def test_a_second_run_into_the_same_folder_sets_the_first_aside(tmp_path):
    out = tmp_path / "default"
    out.mkdir()
    (out / results.ROUNDS_FILE).write_text('{"round": 0}\n')
    (out / "summary.md").write_text("first run")
    moved = set_aside_previous_run(out)
    assert moved is not None and not out.exists()
    assert (moved / "summary.md").read_text() == "first run"  # nothing lost
    out.mkdir()
    (out / results.ROUNDS_FILE).write_text('{"round": 0}\n')
    again = set_aside_previous_run(out)
    assert again is not None and again != moved and moved.exists()
    assert set_aside_previous_run(tmp_path / "empty") is None


def test_a_run_folder_holding_the_working_directory_is_never_moved(tmp_path, monkeypatch):
    from fedlora.config import ConfigError

    (tmp_path / results.ROUNDS_FILE).write_text('{"round": 0}\n')
    (tmp_path / "my_code.py").write_text("")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="contains the working directory"):
        set_aside_previous_run(tmp_path)
    assert (tmp_path / "my_code.py").is_file()


def test_the_embedded_decoder_is_exported_with_a_base_that_loads(monkeypatch):
    """Its weights are a GGUF conversion, not the Hub's checkpoint: the card names the
    converted folder, never the word 'embedded'."""
    from fedlora.server import model_card

    monkeypatch.setattr(model_card, "resolve_model_path", lambda model, task: "/cache/smollm2")
    assert model_card.portable_base(RunConfig(task="causal-lm")) == "/cache/smollm2"
    assert model_card.portable_base(RunConfig()) == "sentence-transformers/all-MiniLM-L6-v2"


def test_all_linear_targets_every_linear_layer_but_the_head(tiny_model):
    from peft.tuners.lora import LoraLayer

    from fedlora.model.models import build_lora_model, lora_spec

    cfg = RunConfig(model=str(tiny_model), lora_targets="all-linear")
    model = build_lora_model(cfg.model, 20, lora_spec(cfg), seed=0)
    adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert {"query", "key", "value", "dense"} <= adapted
    assert not any("classifier" in n for n, m in model.named_modules() if isinstance(m, LoraLayer))


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        cli_main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith("fedlora 0.")


def test_importing_the_privacy_code_does_not_double_every_log_line():
    """Opacus calls logging.basicConfig on import: Flower's lines then print twice."""
    import subprocess
    import sys

    check = (
        "import logging, fedlora.privacy.dp_sgd, opacus; "
        "assert logging.getLogger().handlers == [], logging.getLogger().handlers"
    )
    subprocess.run([sys.executable, "-c", check], check=True, capture_output=True)


def test_the_summary_says_which_replies_were_not_used_and_why(tmp_path):
    records = [
        {"round": 0, "eval_accuracy": 0.1},
        {
            "round": 1,
            "num_ok": 1,
            "num_sampled": 3,
            "nodes": [
                {"node_id": 11, "status": "ok", "reason": ""},
                {"node_id": 22, "status": "dropped", "reason": "tensors contain NaN or Inf"},
                {"node_id": 33, "status": "missing", "reason": "no reply before round-timeout"},
            ],
        },
    ]
    text = results.write_summary(tmp_path, records, {}).read_text()
    assert "## Replies not used" in text
    assert "| 1 | 22 | dropped | tensors contain NaN or Inf |" in text
    assert "| 1 | 33 | missing | no reply before round-timeout |" in text
    assert "| 1 | 11 |" not in text


def test_the_summary_gives_the_score_of_always_answering_the_most_common_answer(tmp_path):
    import pandas as pd

    from fedlora.data.tables import most_common_share

    answers = pd.DataFrame({"response": ["earn"] * 5 + ["acq"] * 3 + ["ship"] * 2})
    assert most_common_share(answers, "causal-lm") == 0.5
    labels = pd.DataFrame({"label": [0, 1, 1, 2]})
    assert most_common_share(labels) == 0.5 and most_common_share(labels.iloc[:0]) is None
    records = [{"round": 0, "eval_accuracy": 0.0, "most_common_answer": 0.5}]
    text = results.write_summary(tmp_path, records, {}).read_text()
    assert "- **always the most common answer** would score: 0.5000" in text


def test_the_hub_is_switched_off_only_for_runs_that_name_no_hub_model(tmp_path, monkeypatch):
    from fedlora.run.launch import flower_env
    from fedlora.run.local_run import names_hub

    assert not names_hub({}) and not names_hub({"model": "embedded"})
    assert not names_hub({"model": str(tmp_path)})
    assert names_hub({"model": "Qwen/Qwen2.5-0.5B-Instruct"})
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert flower_env(tmp_path)["HF_HUB_OFFLINE"] == "1"
    assert flower_env(tmp_path, offline=False)["HF_HUB_OFFLINE"] == "0"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the user's own setting wins
    assert flower_env(tmp_path, offline=False)["HF_HUB_OFFLINE"] == "1"


def test_an_unreachable_hub_model_says_what_is_missing(capsys):
    err = _refused(capsys, "-c", "model=nobody/no-such-model-xyz")
    assert "'model': 'nobody/no-such-model-xyz' cannot be loaded" in err
    assert "Hugging Face Hub is offline" in err and "huggingface-cli download" in err


def _hub_layout_folder(root):
    """A dataset folder as the Hub lays it out: data/{train,test}-*.parquet, ClassLabel."""
    import datasets

    features = datasets.Features(
        {"body": datasets.Value("string"), "topic": datasets.ClassLabel(names=["sport", "space"])}
    )
    (root / "data").mkdir(parents=True)
    for split, n in (("train", 30), ("test", 10)):
        labels = [i % 2 for i in range(n)]
        labels[0] = -1  # unlabelled, as in test splits on the Hub
        rows = {"body": [f"{split} text {i}" for i in range(n)], "topic": labels}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(
            str(root / "data" / f"{split}-00000-of-00001.parquet")
        )
    return root


def test_a_dataset_folder_in_the_hub_layout_reads_with_its_label_names(tmp_path):
    from fedlora.data.tables import load_table

    folder = _hub_layout_folder(tmp_path / "topics")
    cfg = RunConfig(dataset=str(folder), text_column="body", label_column="topic")
    table = load_table(cfg.data)
    assert table.label_names == ("space", "sport")  # names, not 0 / 1
    assert len(table.train) + len(table.test) == 38  # both splits, pooled, unlabelled out
    # a saved DatasetDict (save_to_disk) reads the same way
    import datasets

    saved = tmp_path / "saved"
    datasets.load_dataset(str(folder)).save_to_disk(str(saved))
    other = load_table(cfg.replace(dataset=str(saved)).data)
    assert other.label_names == table.label_names


def test_a_hub_dataset_id_offline_says_what_is_missing(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = _refused(capsys, "-c", "dataset=nobody/no-such-dataset-xyz")
    assert "'dataset': 'nobody/no-such-dataset-xyz' cannot be loaded" in err
    assert "Hub is offline" in err


@pytest.mark.parametrize("partitioner", ["pathological", "linear", "square", "exponential"])
def test_flwr_datasets_partitioners_split_the_data(partitioner):
    import numpy as np

    from fedlora.data.tables import load_table, partition

    cfg = RunConfig(partitioner=partitioner, classes_per_partition=2)
    table = load_table(cfg.data)
    parts = [partition(table.train, cfg.data, i, 5) for i in range(5)]
    assert sum(len(p) for p in parts) <= len(table.train) and all(len(p) > 0 for p in parts)
    if partitioner == "pathological":
        assert all(p["label"].nunique() <= 2 for p in parts)
    else:
        sizes = np.array([len(p) for p in parts])
        assert sizes[-1] > sizes[0]  # growing sizes, as the partitioner's name says


def test_a_bad_polling_interval_is_named_before_any_process_starts(tmp_path, capsys, monkeypatch):
    import fedlora.run.launch as launch

    def no_processes(*args, **kwargs):
        raise AssertionError("deploy-local started a process before checking its environment")

    monkeypatch.setattr(launch.LocalFederation, "start", no_processes)
    monkeypatch.setenv("FEDLORA_SUPERNODE_IDLE_PULL", "0")
    code = cli_main(["deploy-local", "--output-dir", str(tmp_path / "run")])
    assert code == 2
    assert "FEDLORA_SUPERNODE_IDLE_PULL: '0'" in capsys.readouterr().err
