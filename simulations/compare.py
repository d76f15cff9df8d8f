"""Comparison runner: scenarios x seeds in simulation, then one table and a set of plots.

    .venv/bin/python simulations/compare.py --scenarios fedavg ffa_lora flora lora_fair \
        --seeds 0 1 2 --out results/compare

Each cell (scenario, seed) is a full `flwr run` simulation of the app on its own output
folder; a finished cell (its summary.md exists) is not run again, so an interrupted
comparison resumes where it stopped. ``--centralized`` adds the pooled-data reference
with the same step budget. The table (mean and spread over seeds) goes to
``OUT/comparison.md``, the plots to ``OUT/*.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from fedlora.config import RunConfig
from fedlora.run import results

SCENARIOS = Path(__file__).resolve().parent / "scenarios"


def load_scenario(name: str) -> dict[str, Any]:
    """Run-config overrides of ``simulations/scenarios/NAME.toml`` (validated)."""
    from fedlora.run.cli import load_scenario as load

    overrides = load(name, SCENARIOS)
    RunConfig.from_mapping(overrides)
    return overrides


def run_cells(
    scenarios: list[str], seeds: list[int], out: Path, supernodes: int, extra: dict[str, Any]
) -> None:
    """Run every missing (scenario, seed) cell against one local simulation SuperLink."""
    from rich.progress import Progress

    from fedlora.run.launch import LaunchError, local_federation

    configs = {s: load_scenario(s) for s in scenarios}
    cells = [(s, seed) for seed in seeds for s in scenarios]  # every scenario gets a seed first
    todo = [
        (s, seed)
        for s, seed in cells
        if not _done(out / s / f"seed-{seed}", {**configs[s], **extra})
    ]
    if not todo:
        return
    with local_federation(out / ".flwr") as fed, Progress() as progress:
        fed.start_superlink(simulation=True)
        task = progress.add_task("cells", total=len(cells), completed=len(cells) - len(todo))
        for scenario, seed in todo:
            cell = out / scenario / f"seed-{seed}"
            scenario_config = configs[scenario]
            nodes = int(scenario_config.get("num-partitions", supernodes))  # natural splits
            if cell.exists():  # an interrupted cell: start it again from scratch
                import shutil

                shutil.rmtree(cell)
            overrides = {
                **scenario_config,
                **extra,
                "seed": seed,
                "num-partitions": nodes,
                "output-dir": str(cell),
            }
            progress.update(task, description=f"{scenario} seed {seed}")
            log = (out / "logs").joinpath(f"{scenario}-seed-{seed}.log")
            log.parent.mkdir(parents=True, exist_ok=True)
            try:
                with log.open("w") as fh:
                    fed.run_app(
                        overrides,
                        {
                            "num-supernodes": nodes,
                            "client-resources-num-cpus": 1,
                            "init-args-num-cpus": 2,
                        },
                        stream_to=fh,
                    )
            except LaunchError as err:
                progress.console.print(f"[red]{scenario} seed {seed} failed:[/red] {err}")
            progress.advance(task)


def _done(cell: Path, wanted: dict[str, Any]) -> bool:
    """Whether ``cell`` finished with the settings ``wanted`` asks for: its scenario's and
    the overrides' (a cell of another setting, say another learning rate or an edited
    scenario file, is run again)."""
    if not (cell / results.SUMMARY_FILE).is_file():
        return False
    if not wanted:
        return True
    settings = cell / "run_config.json"
    if not settings.is_file():  # an older cell that did not record its settings
        return False
    ran = json.loads(settings.read_text())
    expected = json.loads(RunConfig.from_mapping(wanted).to_json())
    return all(ran.get(key) == expected[key] for key in wanted if key in expected)


def final_accuracy(cell: Path) -> float | None:
    """The last round's server-side accuracy of a finished cell."""
    records = results.read_records(cell)
    return None if not records else records[-1].get("eval_accuracy")


def tune(
    scenarios: list[str],
    seeds: list[int],
    out: Path,
    supernodes: int,
    extra: dict[str, Any],
    key: str,
    candidates: list[str],
    fraction: float,
) -> tuple[dict[str, Any], str]:
    """Per scenario, the candidate of ``key`` with the best mean final validation accuracy.

    Every candidate runs on every seed with ``validation-fraction`` rows held out of the
    training data before partitioning and the server evaluating on them
    (``eval-split=validation``): the test split is never read. Returns the choice per
    scenario and a markdown table of what was tried.
    """
    from fedlora.run.cli import parse_overrides

    values = [parse_overrides([f"{key}={c}"])[key] for c in candidates]
    chosen: dict[str, Any] = {}
    rows = [
        f"Tuned `{key}` over {candidates} on a validation split "
        f"(validation-fraction={fraction}, held out of the clients' training data; the test "
        f"split is not read), seeds {seeds}; the choice maximises the mean final validation "
        "accuracy.\n",
        "| scenario | " + " | ".join(f"{key}={c}" for c in candidates) + " | chosen |",
        "|---|" + "---:|" * len(candidates) + "---|",
    ]
    for scenario in scenarios:
        scores = []
        for value, label in zip(values, candidates, strict=True):
            folder = out / "tuning" / f"{key}={label}"
            settings = {**extra, key: value, "validation-fraction": fraction}
            settings["eval-split"] = "validation"
            run_cells([scenario], seeds, folder, supernodes, settings)
            accs = [final_accuracy(c) for c in _finished(folder / scenario, seeds)]
            scores.append([a for a in accs if a is not None])
        means = [float(np.mean(a)) if a else -1.0 for a in scores]
        best = int(np.argmax(means))
        chosen[scenario] = values[best]
        rows.append(
            f"| {scenario} | " + " | ".join(_stats(a) for a in scores) + f" | {candidates[best]} |"
        )
    return chosen, "\n".join(rows) + "\n"


def run_centralized(seeds: list[int], out: Path, extra: dict[str, Any]) -> None:
    """The pooled-data reference per seed (cached in OUT/centralized/seed-N.json)."""
    from fedlora.run.centralized import run_centralized as train

    for seed in seeds:
        path = out / "centralized" / f"seed-{seed}.json"
        if path.is_file():
            continue
        cfg = RunConfig.from_mapping({**load_scenario("fedavg"), **extra, "seed": seed})
        res = train(cfg)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            json.dumps(
                {
                    "accuracy": res.accuracy,
                    "loss": res.loss,
                    "steps": res.steps,
                    "seconds": res.seconds,
                }
            )
        )


def _stats(values: list[float]) -> str:
    values = [v for v in values if v is not None and np.isfinite(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"


def collect(scenarios: list[str], seeds: list[int], out: Path) -> dict[str, list[list[dict]]]:
    """Per scenario, the round records of each finished seed."""
    data: dict[str, list[list[dict]]] = {}
    for s in scenarios:
        runs = [results.read_records(cell) for cell in _finished(out / s, seeds)]
        data[s] = [r for r in runs if r]
    return data


def _finished(folder: Path, seeds: list[int]) -> list[Path]:
    """The cells of ``seeds`` under ``folder`` whose run finished (a cell still running
    or cut short has rounds but no summary)."""
    cells = [folder / f"seed-{seed}" for seed in seeds]
    return [c for c in cells if (c / results.SUMMARY_FILE).is_file()]


def _mean_error(records: list[dict]) -> float:
    values = [x["aggregation_error"] for x in records[1:] if x.get("aggregation_error") is not None]
    return float(np.mean(values)) if values else float("nan")


def _compression(runs: list[list[dict]], way: str) -> float:
    """Dense float32 bytes over bytes sent, summed over runs (NaN before byte accounting)."""
    dense = sum(x.get(f"dense_{way}") or 0 for r in runs for x in r[1:])
    sent = sum(x.get(f"bytes_{way}") or 0 for r in runs for x in r[1:])
    return dense / sent if dense and sent else float("nan")


def _ratio(runs: list[list[dict]], way: str) -> str:
    ratio = _compression(runs, way)
    return f"{ratio:.1f}x" if np.isfinite(ratio) else "-"


def _save(fig: Any, path: Path) -> Path:
    """Lay out, write and close a figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _value(record: dict, key: str) -> float:
    """A record's number, NaN when absent (0.0 is a value: FLoRA's error is exactly 0)."""
    value = record.get(key)
    return np.nan if value is None else float(value)


def _max_epsilon(records: list[dict]) -> float:
    """The largest epsilon any node reported in a run (NaN for a run without DP)."""
    values = [
        n["epsilon"] for x in records for n in x.get("nodes", []) if n.get("epsilon") is not None
    ]
    return float(max(values)) if values else float("nan")


def _codec_share(records: list[dict]) -> float:
    """(Clients' encode + server's decode) / clients' training time, summed over a run."""
    ok = [n for x in records[1:] for n in x.get("nodes", []) if n.get("status") == "ok"]
    train = sum(n.get("train_seconds") or 0 for n in ok)
    codec = sum(n.get("encode_seconds") or 0 for n in ok)
    codec += sum((x.get("metrics") or {}).get("decode-seconds") or 0 for x in records[1:])
    return codec / train if train else float("nan")


def _budget(cells: list[Path]) -> str:
    """The client step budget, learning rate and alpha the cells ran with (run_config.json).

    rounds x clients per round x local steps, of batch-size x grad-accumulation examples:
    the fixed budget a comparison holds equal. Cells that disagree are listed apart.
    """
    seen = []
    for cell in cells:
        path = cell / "run_config.json"
        if not path.is_file():
            continue
        # an older cell lacks the keys added since; it ran at their default
        c = {**RunConfig().to_mapping(), **json.loads(path.read_text())}
        batch = c["batch-size"] * c["grad-accumulation"]
        text = (
            f"{c['num-server-rounds']}x{c['clients-per-round']}x{c['local-steps']} "
            f"of {batch}, lr {c['lr']:g}, alpha {c['lora-alpha']:g}"
        )
        if text not in seen:
            seen.append(text)
    return "; ".join(seen) or "-"


def _up_kib(records: list[dict]) -> float:
    return float(np.mean([x.get("bytes_up") or 0 for x in records[1:]])) / 1024


def table(data: dict[str, list[list[dict]]], out: Path, seeds: list[int]) -> str:
    """Markdown table: final accuracy, aggregation error, bytes per round, wall time."""
    rows = [
        "| scenario | seeds | final accuracy | best accuracy | held-out loss, round 0 -> final | "
        "mean agg. error | up KiB/round | down KiB/round | dense ÷ sent (up / down) | "
        "codec ÷ train | max epsilon | client steps, lr, alpha | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for name, runs in data.items():
        if not runs:
            rows.append(f"| {name} | 0 | - | - | - | - | - | - | - | - | - | - | - |")
            continue
        final = [r[-1].get("eval_accuracy") for r in runs]
        best = [max(x.get("eval_accuracy") or 0 for x in r) for r in runs]
        err = [_mean_error(r) for r in runs]
        up = [_up_kib(r) for r in runs]
        down = [np.mean([x.get("bytes_down") or 0 for x in r[1:]]) / 1024 for r in runs]
        wall = [sum(x.get("seconds") or 0 for x in r) for r in runs]
        loss = f"{_stats([r[0].get('eval_loss') for r in runs])} -> "
        loss += _stats([r[-1].get("eval_loss") for r in runs])
        rows.append(
            f"| {name} | {len(runs)} | {_stats(final)} | {_stats(best)} | {loss} | "
            f"{np.mean(err):.2e} | {np.mean(up):.1f} | {np.mean(down):.1f} | "
            f"{_ratio(runs, 'up')} / {_ratio(runs, 'down')} | "
            f"{np.mean([_codec_share(r) for r in runs]):.1e} | "
            f"{_stats([_max_epsilon(r) for r in runs])} | "
            f"{_budget(_finished(out / name, seeds))} | {np.mean(wall):.0f} |"
        )
    central = [
        json.loads(p.read_text())["accuracy"]
        for p in sorted((out / "centralized").glob("seed-*.json"))
    ]
    if central:
        rows.append(
            f"| centralised (pooled data, same steps) | {len(central)} | "
            f"{_stats(central)} | - | - | - | - | - | - | - | - | - | - |"
        )
    return "\n".join(rows) + "\n"


def accuracy_by_seed(scenario: str, seeds: list[int], out: Path, last: int = 1) -> dict[int, float]:
    """Mean accuracy over the last ``last`` rounds of each finished seed (1: the final)."""
    found = {}
    for cell in _finished(out / scenario, seeds):
        values = [r.get("eval_accuracy") for r in results.read_records(cell)[1:]][-last:]
        if values and None not in values:
            found[int(cell.name.removeprefix("seed-"))] = float(np.mean(values))
    return found


def paired_table(scenarios: list[str], out: Path, seeds: list[int], baseline: str) -> str:
    """Each scenario against ``baseline`` on the same seeds: accuracy lost and bytes saved.

    Pairing by seed removes the spread that the partition and the sampling put into
    both runs alike, which is larger than the differences between codecs. The mean of
    the last 3 rounds is beside the final accuracy: one round moves it by a few points.
    """
    rows = [
        f"| scenario | seeds paired with {baseline} | final accuracy - {baseline}, per seed | "
        "mean | sd | last 3 rounds' mean - the same, mean | dense ÷ sent (up) |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    base, base3 = (accuracy_by_seed(baseline, seeds, out, k) for k in (1, 3))
    for name in scenarios:
        if name == baseline:
            continue
        finals, last3 = (accuracy_by_seed(name, seeds, out, k) for k in (1, 3))
        common = [seed for seed in seeds if seed in finals and seed in base]
        diffs = [finals[seed] - base[seed] for seed in common]
        per_seed = " / ".join(f"{d:+.3f}" for d in diffs) or "-"
        mean = f"{np.mean(diffs):+.3f}" if diffs else "-"
        sd = f"{np.std(diffs, ddof=1):.3f}" if len(diffs) > 1 else "-"
        mean3 = f"{np.mean([last3[s] - base3[s] for s in common]):+.3f}" if common else "-"
        paired = [results.read_records(out / name / f"seed-{seed}") for seed in common]
        ratio = _ratio(paired, "up") if paired else "-"
        rows.append(
            f"| {name} | {', '.join(map(str, common)) or '-'} | {per_seed} | {mean} | {sd} "
            f"| {mean3} | {ratio} |"
        )
    return "\n".join(rows) + "\n"


def plots(data: dict[str, list[list[dict]]], out: Path) -> list[Path]:
    """Accuracy per round (mean, min-max band), aggregation error and bytes per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(21, 4.5))
    for name, runs in data.items():
        if not runs:
            continue
        n = min(len(r) for r in runs)
        acc = np.array([[_value(x, "eval_accuracy") for x in r[:n]] for r in runs])
        x = np.arange(n)
        line = axes[0].plot(x, np.nanmean(acc, 0), marker="o", ms=3, label=name)[0]
        axes[0].fill_between(
            x, np.nanmin(acc, 0), np.nanmax(acc, 0), alpha=0.2, color=line.get_color()
        )
        loss = np.array([[_value(x, "eval_loss") for x in r[:n]] for r in runs])
        axes[3].plot(x, np.nanmean(loss, 0), marker="o", ms=3, label=name, color=line.get_color())
        err = np.array([[_value(x, "aggregation_error") for x in r[1:n]] for r in runs])
        with warnings.catch_warnings():  # a round with no error (calibration) stays a gap
            warnings.simplefilter("ignore", RuntimeWarning)
            mean_err = np.nanmean(err, 0)
        axes[1].plot(x[1:], np.maximum(mean_err, 1e-12), marker="o", ms=3, label=name)
        up = np.array([[(x.get("bytes_up") or 0) / 1024 for x in r[1:n]] for r in runs])
        down = np.array([[(x.get("bytes_down") or 0) / 1024 for x in r[1:n]] for r in runs])
        axes[2].plot(x[1:], up.mean(0), label=f"{name} up", color=line.get_color())
        axes[2].plot(x[1:], down.mean(0), ls="--", color=line.get_color())
    axes[0].set(title="server-side accuracy (mean, min-max over seeds)", xlabel="round")
    axes[1].set(title="relative aggregation error (0 drawn at 1e-12)", xlabel="round", yscale="log")
    axes[2].set(title="KiB per round (solid up, dashed down)", xlabel="round")
    axes[3].set(title="held-out loss (mean over seeds)", xlabel="round")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return [_save(fig, out / "comparison.png"), tradeoffs(data, out)]


def tradeoffs(data: dict[str, list[list[dict]]], out: Path) -> Path:
    """Final accuracy against uplink KiB per round, and against the largest epsilon spent
    when some runs used DP."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finished = {name: runs for name, runs in data.items() if runs}
    with_dp = any(np.isfinite(_max_epsilon(r)) for runs in finished.values() for r in runs)
    fig, axes = plt.subplots(1, 2 if with_dp else 1, figsize=(11 if with_dp else 6, 4.5))
    axes = np.atleast_1d(axes)
    for name, runs in finished.items():
        acc = np.array([_value(r[-1], "eval_accuracy") for r in runs])
        up = np.array([_up_kib(r) for r in runs])
        eps = np.array([_max_epsilon(r) for r in runs])
        axes[0].errorbar(up.mean(), acc.mean(), yerr=acc.std(), fmt="o", capsize=3, label=name)
        if with_dp and np.isfinite(eps).any():
            axes[1].errorbar(
                np.nanmean(eps), acc.mean(), yerr=acc.std(), fmt="o", capsize=3, label=name
            )
    axes[0].set(title="final accuracy vs uplink", xlabel="uplink KiB per round", xscale="log")
    if with_dp:
        axes[1].set(title="final accuracy vs privacy (DP runs)", xlabel="largest epsilon spent")
    for ax in axes:
        ax.set_ylabel("final accuracy (mean, ±1 sd over seeds)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return _save(fig, out / "tradeoffs.png")


def paired_plot(scenarios: list[str], out: Path, seeds: list[int], baseline: str) -> Path:
    """Accuracy minus the baseline's on the same seed, against uplink bytes saved."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = accuracy_by_seed(baseline, seeds, out)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = 0
    for name in scenarios:
        finals = accuracy_by_seed(name, seeds, out)
        common = [seed for seed in seeds if seed in finals and seed in base]
        if name == baseline or not common:
            continue
        runs = [results.read_records(out / name / f"seed-{seed}") for seed in common]
        ratio = _compression(runs, "up")
        if not np.isfinite(ratio):  # runs from before byte accounting have no x
            continue
        diffs = np.array([finals[seed] - base[seed] for seed in common])
        line = ax.plot([ratio] * len(diffs), diffs, "o", alpha=0.35, ms=4)[0]
        ax.plot(ratio, diffs.mean(), "D", color=line.get_color(), ms=7)
        ax.annotate(  # labels alternate above and below: neighbours in the grid sit close
            name,
            (ratio, diffs.mean()),
            fontsize=7,
            xytext=(5, 4 if drawn % 2 == 0 else -10),
            textcoords="offset points",
        )
        drawn += 1
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xticks([1, 2, 5, 10, 20, 50, 100], ["1x", "2x", "5x", "10x", "20x", "50x", "100x"])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set(
        xlabel="dense float32 ÷ bytes sent (uplink)",
        ylabel=f"final accuracy - {baseline}, same seed",
        title=f"paired with {baseline}: seeds (dots) and their mean (diamond)",
    )
    ax.grid(alpha=0.3)
    return _save(fig, out / "paired.png")


def main(argv: list[str] | None = None) -> int:
    """Run the grid (missing cells only), then write the table and the plots."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--scenarios", nargs="+", default=["fedavg", "ffa_lora", "flora", "lora_fair"]
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default="results/compare")
    parser.add_argument("--supernodes", type=int, default=10)
    parser.add_argument("--centralized", action="store_true", help="add the pooled-data reference")
    parser.add_argument("--report-only", action="store_true", help="tabulate finished cells only")
    parser.add_argument(
        "--baseline",
        metavar="SCENARIO",
        help="add a table of every scenario against this one, paired by seed",
    )
    parser.add_argument(
        "--tune",
        metavar="KEY=V1,V2,...",
        help="choose KEY per scenario on a validation split first (e.g. lr=1e-3,3e-3,1e-2); "
        "the reported runs then use the choice, the same split held out, and the test set",
    )
    parser.add_argument(
        "--tune-seeds",
        type=int,
        nargs="+",
        metavar="N",
        help="with --tune: the seeds the candidates run on (default: --seeds); the reported "
        "runs use --seeds",
    )
    parser.add_argument(
        "--validation-fraction",
        type=float,
        default=0.1,
        help="with --tune: the share of training rows held out for validation (default 0.1)",
    )
    parser.add_argument(
        "-c",
        "--config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="run-config override applied to every cell",
    )
    args = parser.parse_args(argv)
    from fedlora.run.cli import parse_overrides

    out = Path(args.out).resolve()
    extra = parse_overrides(args.config)
    for s in args.scenarios:
        load_scenario(s)
    if args.baseline and args.baseline not in args.scenarios:  # before hours of runs, not after
        parser.error(f"--baseline {args.baseline} is not one of --scenarios")
    if args.tune_seeds and not args.tune:
        parser.error("--tune-seeds needs --tune")
    tuning = None
    if args.tune:
        key, _, listed = args.tune.partition("=")
        candidates = [c.strip() for c in listed.split(",") if c.strip()]
        if not key or len(candidates) < 2:
            parser.error(f"--tune {args.tune!r}: expected KEY=V1,V2[,...]")
        for c in candidates:  # a bad candidate fails now, not after hours of runs
            RunConfig.from_mapping({**extra, **parse_overrides([f"{key}={c}"])})
        RunConfig.from_mapping({**extra, "validation-fraction": args.validation_fraction})
    if not args.report_only:
        if args.centralized:
            run_centralized(args.seeds, out, extra)
        if args.tune:
            chosen, tuning = tune(
                args.scenarios,
                args.tune_seeds or args.seeds,
                out,
                args.supernodes,
                extra,
                key,
                candidates,
                args.validation_fraction,
            )
            (out / "tuning.md").write_text(tuning)
            for scenario in args.scenarios:  # the reported runs: same split held out, on test
                settings = {**extra, key: chosen[scenario]}
                settings |= {"validation-fraction": args.validation_fraction, "eval-split": "test"}
                run_cells([scenario], args.seeds, out, args.supernodes, settings)
        else:
            run_cells(args.scenarios, args.seeds, out, args.supernodes, extra)
    data = collect(args.scenarios, args.seeds, out)
    text = table(data, out, args.seeds)
    if tuning:
        text = tuning + "\n" + text
    if args.baseline:
        text += "\n" + paired_table(args.scenarios, out, args.seeds, args.baseline)
    (out / "comparison.md").write_text(text)
    paths = plots(data, out)
    if args.baseline:
        paths.append(paired_plot(args.scenarios, out, args.seeds, args.baseline))
    print(text)
    print("plots:", ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as interrupted:  # Ctrl-C, SIGTERM, SIGHUP: processes are stopped
        print(f"\ncompare.py: stopped ({interrupted}); finished cells are kept", file=sys.stderr)
        sys.exit(130)
