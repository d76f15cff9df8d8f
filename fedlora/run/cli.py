"""The ``fedlora`` command: run, deploy locally, report, list strategies, baseline."""

from __future__ import annotations

import argparse
import signal
import sys
import tomllib
from pathlib import Path
from typing import Any

from fedlora.config import ConfigError, RunConfig
from fedlora.run import results
from fedlora.run.local_run import (
    check_gpus_per_client,
    fit_to_nodes,
    make_room,
    names_hub,
    simulation_federation,
)
from fedlora.run.tracking import check_available as check_tracker


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs with TOML values (bare words are taken as strings)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"Expected key=value, got {pair!r}")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        out[key.strip()] = value
    return out


SCENARIO_DIR = Path(__file__).resolve().parents[2] / "simulations" / "scenarios"


def load_scenario(name: str, folder: Path = SCENARIO_DIR, _seen: tuple[str, ...] = ()) -> dict:
    """Run-config overrides from a TOML file, or from ``FOLDER/NAME.toml``.

    ``extends = "other"`` starts from another scenario, so a variant states only what differs.
    """
    path = Path(name)
    if not path.is_file():
        path = folder / f"{name}.toml"
    if not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.toml"))
        raise ConfigError(
            f"Invalid value for 'scenario': {name!r} is neither a file nor one of {known}"
        )
    if name in _seen:
        raise ConfigError(f"Invalid value for 'extends': {name!r} extends itself ({_seen})")
    try:
        overrides = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"Invalid value for 'scenario': {path} is not TOML ({err})") from None
    parent = overrides.pop("extends", None)
    if parent is not None:  # looked up beside the file that extends it
        overrides = load_scenario(str(parent), path.parent, (*_seen, name)) | overrides
    return overrides


def _config(args: argparse.Namespace, nodes: int | None = None) -> dict[str, Any]:
    """The run-config overrides of a command, validated and pre-flighted.

    ``nodes``: the federation's size, when the command starts it (simulate, deploy-local).
    """
    overrides = load_scenario(args.scenario) if getattr(args, "scenario", None) else {}
    overrides |= parse_overrides(args.config or [])
    if getattr(args, "output_dir", None):
        overrides["output-dir"] = args.output_dir
    if nodes is not None:
        overrides.setdefault("num-partitions", nodes)
        overrides, notes = fit_to_nodes(overrides, nodes)
        for note in notes:
            print(f"fedlora: {note}", file=sys.stderr)
    # The ServerApp runs in another working directory: always pass absolute paths.
    default = RunConfig().output_dir
    overrides["output-dir"] = str(Path(overrides.get("output-dir", default)).resolve())
    for key in ("dataset", "model"):
        value = str(overrides.get(key, ""))
        if value and Path(value).expanduser().exists() and not Path(value).is_absolute():
            overrides[key] = str(Path(value).expanduser().resolve())
    cfg = RunConfig.from_mapping(overrides)  # fail here, before any process starts
    check_tracker(cfg.tracking)
    preflight(cfg, local=nodes is not None)
    return overrides


def preflight(cfg: RunConfig, local: bool = False) -> None:
    """Everything that can be checked before a process starts: strategy, model, targets.

    ``local``: the command trains on this machine (simulate, deploy-local), so the
    device and precision must exist here too.
    """
    from fedlora.run.preflight import check_accelerators, check_model, check_paths
    from fedlora.run.registry import check_run_strategy

    check_paths(cfg)
    check_accelerators(cfg, local=local)
    check_run_strategy(cfg)
    check_model(cfg)


def cmd_simulate(args: argparse.Namespace) -> int:
    """Simulated federation with Flower's simulation runtime (Ray), on this machine."""
    out = simulate_from_args(args)
    return cmd_report(argparse.Namespace(output_dir=str(out)))


def simulate_from_args(args: argparse.Namespace) -> Path:
    """``fedlora simulate``'s work without the report; returns the output folder."""
    from fedlora.run.launch import local_federation

    check_gpus_per_client(args.gpus_per_client)
    if args.supernodes is None:  # a scenario's own partition count, else 10
        scenario = load_scenario(args.scenario) if args.scenario else {}
        given = scenario | parse_overrides(args.config or [])
        args.supernodes = int(given.get("num-partitions", 10))
    overrides = _config(args, nodes=args.supernodes)
    if int(overrides["num-partitions"]) != args.supernodes:
        raise ConfigError(
            f"Invalid value for 'num-partitions': {overrides['num-partitions']} must equal "
            f"--supernodes ({args.supernodes}) in simulation"
        )
    federation = simulation_federation(args.supernodes, args.cpus, args.gpus_per_client)
    make_room(overrides)
    print(f"fedlora: {estimate_line(RunConfig.from_mapping(overrides))}", file=sys.stderr)
    offline = not names_hub(overrides)
    with local_federation(threads=1, offline=offline) as fed:
        fed.start_superlink(simulation=True)
        status = fed.run_app(overrides, federation, stream_to=sys.stdout)
    print(f"\nrun {status['run-id']}: {status['status']} in {status['elapsed']:.1f}s")
    return Path(overrides["output-dir"])


def estimate_line(cfg: RunConfig) -> str:
    """``simulate``'s pre-flight line: what the run costs per client."""
    from fedlora.run.estimate import estimate, summary_line

    try:
        return summary_line(estimate(cfg))
    except Exception as err:  # an estimate must never stop a run that passed its checks
        return f"no estimate ({type(err).__name__}: {err})"


def cmd_estimate(args: argparse.Namespace) -> int:
    """Parameters, adapter bytes on the wire and device memory of a run, before running it."""
    from fedlora.run.estimate import estimate
    from fedlora.run.preflight import check_accelerators

    overrides = load_scenario(args.scenario) if args.scenario else {}
    overrides |= parse_overrides(args.config or [])
    cfg = RunConfig.from_mapping(overrides)
    check_accelerators(cfg, local=False)
    e = estimate(cfg)
    setting = (
        f"{cfg.model}, {cfg.task}, rank {cfg.lora_rank}, batch {cfg.batch_size} x "
        f"{cfg.max_seq_len} tokens, precision {cfg.precision} ({8 * e.compute_bytes}-bit "
        f"compute), base {cfg.base_quantization}, checkpointing "
        f"{'on' if cfg.gradient_checkpointing else 'off'}, DP {'on' if cfg.dp else 'off'}"
    )
    width = max(len(k) for k, _ in e.rows())
    print(setting)
    for key, value in e.rows():
        print(f"  {key:<{width}}  {value}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """An exported adapter's predictions for texts (arguments, or one per line of --file)."""
    from fedlora.run.predict import predict

    texts = list(args.texts)
    if args.file:
        texts += [line for line in Path(args.file).read_text().splitlines() if line.strip()]
    if not texts:
        raise ConfigError("Nothing to predict: give texts as arguments or --file FILE")
    for p in predict(Path(args.adapter), texts):
        score = "" if p.probability is None else f"  ({p.probability:.2f})"
        print(f"{p.answer}{score}\t{p.text}")
    return 0


def cmd_deploy_local(args: argparse.Namespace) -> int:
    """SuperLink + N SuperNodes over gRPC on loopback (TLS and node auth on), then a run.

    Each SuperNode runs its ClientApp in a warm worker (``fedlora-worker``, model kept
    loaded across rounds) unless ``--per-message``.
    """
    import tempfile

    from fedlora.run.certs import make_node_key, make_server_files
    from fedlora.run.launch import local_federation

    overrides = _config(args, nodes=args.supernodes)
    make_room(overrides)
    offline = not names_hub(overrides)
    with (
        tempfile.TemporaryDirectory(prefix="fedlora-certs-") as keys,
        local_federation(offline=offline) as fed,
    ):
        tls: dict[str, str] | None = None
        if args.insecure:
            print(INSECURE_WARNING, file=sys.stderr)
        else:
            # a throw-away CA whose private key is never written: nothing to leak
            tls = make_server_files(
                Path(keys), ["127.0.0.1", "localhost"], keep_ca_key=False
            ).as_tls()
        fed.start_superlink(simulation=False, tls=tls, node_auth=tls is not None)
        for i in range(args.supernodes):
            key = None
            if tls is not None:
                node_key = make_node_key(Path(keys), f"supernode-{i}")
                fed.register_node(node_key.public)
                key = node_key.private
            node_config = {"partition-id": i, "num-partitions": args.supernodes}
            fed.start_supernode(
                f"supernode-{i}", node_config, tls=tls, auth_key=key, warm=not args.per_message
            )
        status = fed.run_app(overrides, stream_to=sys.stdout)
    print(f"\nrun {status['run-id']}: {status['status']} in {status['elapsed']:.1f}s")
    return cmd_report(argparse.Namespace(output_dir=overrides["output-dir"]))


INSECURE_WARNING = (
    "WARNING: --insecure: no TLS and no node authentication; anyone who can reach the "
    "ports can join the federation or read the updates. Use it on a trusted machine only."
)


def cmd_certs(args: argparse.Namespace) -> int:
    """Write a CA, the SuperLink's TLS certificate and one ECDSA key pair per SuperNode.

    Nothing is replaced without ``--force``: a second CA would invalidate every
    certificate of the first. Without ``--host`` only node keys are added (for a new
    site of an existing federation).
    """
    from fedlora.run.certs import CA_CERT, existing_files, make_node_key, make_server_files

    out = Path(args.out)
    server = bool(args.host)
    if not server and not args.node:
        raise ConfigError("Nothing to make: give --host (CA and SuperLink) and/or --node NAME")
    if not server and not (out / CA_CERT).is_file():
        raise ConfigError(f"No CA in {out}: give --host to make the CA and SuperLink certificate")
    taken = existing_files(out, args.node, server)
    if taken and not args.force:  # checked before anything is written: nothing half-made
        raise ConfigError(
            f"Refusing to overwrite {', '.join(map(str, taken))}: replacing the CA or a key "
            "invalidates what was issued with it. Use --force to replace them, or --node alone "
            "to add a site."
        )
    if server:
        files = make_server_files(out, args.host, overwrite=args.force)
        print(f"CA certificate (give to every SuperNode and flwr user): {files.ca}")
        print(
            f"SuperLink certificate and key (valid for {', '.join(args.host)}): "
            f"{files.cert}, {files.key}"
        )
    for name in args.node:
        key = make_node_key(out, name, overwrite=args.force)
        print(f"SuperNode key {key.private} (stays on the node); register {key.public}")
    if server:
        print(f"CA private key: {out / 'ca.key'} (keep offline)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Print the summary of a finished run and redraw its plot."""
    from rich.console import Console
    from rich.markdown import Markdown

    out = Path(args.output_dir)
    records = results.read_records(out)
    if not records:
        print(f"No {results.ROUNDS_FILE} in {out}", file=sys.stderr)
        return 1
    plot = results.plot_rounds(out, records)
    summary = out / results.SUMMARY_FILE
    text = summary.read_text() if summary.is_file() else results.summary_table(records)
    console = Console()
    if console.width >= 120:
        console.print(Markdown(text))
    else:  # rich would cut the round table's columns ("accura…"): the Markdown reads as is
        print(text)
    print(f"\nresults: {out / results.ROUNDS_FILE}\nplot:    {plot}\nsummary: {summary}")
    return 0


def cmd_strategies(args: argparse.Namespace) -> int:
    """List the registered strategies with a one-line description."""
    from fedlora.run.registry import available, load_strategy_class

    for name, entry in sorted(available().items()):
        try:
            cls = load_strategy_class(name)
            desc = getattr(cls, "description", "") or (cls.__doc__ or "").strip().splitlines()[0]
        except ConfigError as err:
            desc = f"(cannot be imported: {err})"
        print(f"{name:<14} {desc}  [{entry.source}]")
    return 0


def cmd_check_strategy(args: argparse.Namespace) -> int:
    """Run the conformance kit against a strategy; exit 1 if any property fails."""
    from fedlora.run.registry import load_strategy_class
    from fedlora.strategies.conformance import check_strategy

    cls = load_strategy_class(args.name)
    results_ = check_strategy(cls)
    width = max(len(r.name) for r in results_)
    for r in results_:
        mark = "PASS" if r.passed else "FAIL"
        print(f"{mark}  {r.name:<{width}}  {r.detail}")
    failed = sum(not r.passed for r in results_)
    print(f"\n{len(results_) - failed} passed, {failed} failed")
    return 1 if failed else 0


def cmd_new_strategy(args: argparse.Namespace) -> int:
    """Write a ready-to-edit strategy plugin package."""
    from fedlora.run.scaffold import scaffold

    folder = scaffold(args.name, Path(args.dir))
    print(f"Created {folder}\nNext: pip install -e {folder} && fedlora check-strategy {args.name}")
    return 0


def cmd_centralized(args: argparse.Namespace) -> int:
    """Train the centralised reference on pooled data with the federation's budget."""
    from fedlora.run.centralized import run_centralized

    cfg = RunConfig.from_mapping(_config(args))
    res = run_centralized(cfg)
    print(
        f"centralised: accuracy {res.accuracy:.4f}, loss {res.loss:.4f}, "
        f"{res.steps} steps in {res.seconds:.1f}s"
    )
    return 0


def _version(package: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for the docs and tests)."""
    from fedlora import __version__

    parser = argparse.ArgumentParser(prog="fedlora", description=__doc__)
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="debug logs from fedlora and Flower (FLWR_LOG_LEVEL=DEBUG in every process)",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"fedlora {__version__} (flwr {_version('flwr')}, peft {_version('peft')}, "
        f"torch {_version('torch')})",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "-s",
            "--scenario",
            metavar="NAME",
            help="start from simulations/scenarios/NAME.toml (or a TOML file); -c overrides it",
        )
        p.add_argument(
            "-c",
            "--config",
            action="append",
            metavar="KEY=VALUE",
            help="run-config override (repeatable), e.g. -c lora-rank=16",
        )
        p.add_argument("--output-dir", help="where results go (run-config output-dir)")

    p = sub.add_parser("simulate", help=cmd_simulate.__doc__)
    with_config(p)
    p.add_argument(
        "--supernodes",
        type=int,
        default=None,
        help="simulated clients (default: the scenario's num-partitions, else 10)",
    )
    p.add_argument("--cpus", type=int, default=2, help="CPUs Ray may use (default 2)")
    p.add_argument(
        "--gpus-per-client",
        type=float,
        default=0.0,
        metavar="F",
        help="share of a GPU each simulated client holds (0.25: four share one; default 0: "
        "clients get no GPU from Ray)",
    )
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("estimate", help=cmd_estimate.__doc__)
    p.add_argument("-s", "--scenario", metavar="NAME", help="a scenario, as for simulate")
    p.add_argument("-c", "--config", action="append", metavar="KEY=VALUE", help="as for simulate")
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser("predict", help=cmd_predict.__doc__)
    p.add_argument("adapter", help="an exported adapter folder (e.g. results/default/adapter)")
    p.add_argument("texts", nargs="*", help="texts to classify or answer")
    p.add_argument("--file", help="a file with one text per line")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("deploy-local", help=cmd_deploy_local.__doc__)
    with_config(p)
    p.add_argument("--supernodes", type=int, default=2, help="SuperNode processes (default 2)")
    p.add_argument("--insecure", action="store_true", help="no TLS, no node authentication (warns)")
    p.add_argument(
        "--per-message",
        action="store_true",
        help="a fresh ClientApp process for every message (Flower's default), instead of "
        "one warm worker per SuperNode that keeps the model loaded across rounds",
    )
    p.set_defaults(func=cmd_deploy_local)

    p = sub.add_parser("certs", help=cmd_certs.__doc__)
    p.add_argument("--out", default="certs", help="folder for the files (default: certs)")
    p.add_argument(
        "--host",
        action="append",
        default=[],
        help="a name or IP address the SuperLink is reached at (repeatable); makes the CA "
        "and the SuperLink certificate",
    )
    p.add_argument("--force", action="store_true", help="replace existing CA, certificates or keys")
    p.add_argument(
        "--node",
        action="append",
        default=[],
        help="a SuperNode name to make a key pair for (repeatable)",
    )
    p.set_defaults(func=cmd_certs)

    p = sub.add_parser("report", help=cmd_report.__doc__)
    p.add_argument("output_dir", help="a run's output folder")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("strategies", help=cmd_strategies.__doc__)
    p.set_defaults(func=cmd_strategies)

    p = sub.add_parser("check-strategy", help=cmd_check_strategy.__doc__)
    p.add_argument("name", help="registered name or package.module:Class")
    p.set_defaults(func=cmd_check_strategy)

    p = sub.add_parser("new-strategy", help=cmd_new_strategy.__doc__)
    p.add_argument("name", help="strategy name (lowercase, digits, underscores)")
    p.add_argument("--dir", default=".", help="parent folder (default: current)")
    p.set_defaults(func=cmd_new_strategy)

    p = sub.add_parser("centralized", help=cmd_centralized.__doc__)
    with_config(p)
    p.set_defaults(func=cmd_centralized)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedlora`` console script."""
    from fedlora.run.processes import interrupt_on_signals

    args = build_parser().parse_args(argv)
    if args.verbose:  # read by Flower's logger in this process and those it starts
        import logging
        import os

        from flwr.supercore.logger import update_console_handler

        os.environ["FLWR_LOG_LEVEL"] = "DEBUG"
        logging.getLogger("flwr").setLevel(logging.DEBUG)
        update_console_handler(level=logging.DEBUG)
    try:
        with interrupt_on_signals():  # SIGTERM / SIGHUP unwind like Ctrl-C: clean-up runs
            return int(args.func(args))
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM / SIGHUP (launch.Interrupted)
        signum = getattr(err, "signum", signal.SIGINT)
        print(
            f"\nfedlora: stopped by {signal.Signals(signum).name}; every process it started "
            "was stopped",
            file=sys.stderr,
        )
        return 128 + int(signum)
    except ConfigError as err:
        print(f"fedlora: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        from fedlora.run.launch import LaunchError

        if isinstance(err, LaunchError):
            print(f"fedlora: error: {err}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
