"""The accuracy a node gets from its label mix alone, without a model.

Each node guesses its own most common training label for every document of its own
test share; the result is the example-weighted accuracy over all nodes. It is the
baseline a personalised evaluation (FedSA-LoRA's: each node, its own model, its own test
share) has to beat before it shows more than the label skew, as chance (1 / labels) is
for the server's evaluation of one global model.

    .venv/bin/python simulations/local_prior.py --seeds 0 1 2 [-c partitioner=iid ...]
"""

from __future__ import annotations

import argparse

from fedlora.config import RunConfig
from fedlora.data.tables import LABEL, evaluation_rows, load_table, partition
from fedlora.run.cli import parse_overrides


def local_prior_accuracy(cfg: RunConfig) -> float:
    """Share of the nodes' held-out rows whose label is their node's most common one."""
    table = load_table(cfg.data)
    held_out = evaluation_rows(table, cfg.eval_split)
    hits = total = 0
    for pid in range(cfg.num_partitions):
        train = partition(table.train, cfg.data, pid, cfg.num_partitions)
        test = partition(held_out, cfg.data, pid, cfg.num_partitions, split="held-out")
        hits += int((test[LABEL] == train[LABEL].value_counts().idxmax()).sum())
        total += len(test)
    return hits / total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("-c", "--config", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.config)
    for seed in args.seeds:
        cfg = RunConfig.from_mapping({**overrides, "seed": seed})
        print(f"seed {seed}: {local_prior_accuracy(cfg):.3f}")


if __name__ == "__main__":
    main()
