"""What a command that starts a federation on this machine settles before it starts.

``fedlora simulate`` and ``deploy-local`` size the sample to their nodes, move an
earlier run out of the output folder, decide whether the Hugging Face Hub stays on, and
give simulated clients their share of a GPU. Each check raises
:class:`~fedlora.config.ConfigError` naming the value, before any process starts.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from fedlora.config import ConfigError, RunConfig, coerce_value
from fedlora.run import results


def fit_to_nodes(overrides: dict[str, Any], nodes: int) -> tuple[dict[str, Any], list[str]]:
    """``clients-per-round`` and ``min-replies`` fitted to a federation of ``nodes``.

    Values the user set are checked (more than ``nodes`` is an error naming the key);
    defaults are lowered to ``nodes``, with a note saying so: a 2-node federation should
    not wait 15 minutes for the default 4.
    """
    out, notes = dict(overrides), []
    defaults = RunConfig()
    for key, default in (
        ("clients-per-round", defaults.clients_per_round),
        ("min-replies", defaults.min_replies),
    ):
        if key in overrides:
            if coerce_value(key, overrides[key], "int") > nodes:
                raise ConfigError(
                    f"Invalid value for '{key}': {overrides[key]} exceeds --supernodes {nodes} "
                    "(the round would wait for nodes that do not exist)"
                )
        elif default > nodes:
            out[key] = nodes
            notes.append(f"{key} lowered from its default {default} to {nodes} (--supernodes)")
    return out, notes


def make_room(overrides: dict[str, Any]) -> None:
    """Before a local run starts (every check passed): move an earlier run out of the way."""
    if not overrides.get("resume"):
        set_aside_previous_run(Path(overrides["output-dir"]))


def set_aside_previous_run(out: Path) -> Path | None:
    """Move a finished or failed run out of ``out`` so that the same command runs again.

    A second ``make run`` would otherwise stop: the folder already holds a run. Nothing
    is deleted: the old run moves to ``out`` plus the time it was written, and the note
    says where (``-c resume=latest`` continues it instead).
    """
    rounds = out / results.ROUNDS_FILE
    if not rounds.exists():
        return None
    here = Path.cwd().resolve()
    if out.resolve() == here or out.resolve() in here.parents:
        raise ConfigError(
            f"Invalid value for 'output-dir': {str(out)!r} holds an earlier run and contains "
            "the working directory, so it cannot be moved aside; choose another --output-dir"
        )
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(rounds.stat().st_mtime))
    target = out.with_name(f"{out.name}-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = out.with_name(f"{out.name}-{stamp}-{n}")
    try:
        out.rename(target)
    except OSError as err:  # a mount point, a read-only parent
        raise ConfigError(
            f"Invalid value for 'output-dir': {str(out)!r} holds an earlier run that cannot "
            f"be moved aside ({err}); choose another --output-dir, or continue it with "
            "-c resume=latest"
        ) from None
    print(
        f"fedlora: {out} held an earlier run; moved it to {target} (to continue that run "
        f"instead: --output-dir {target} -c resume=latest)",
        file=sys.stderr,
    )
    return target


def names_hub(overrides: dict[str, Any]) -> bool:
    """Whether the run names a hub model or dataset (neither embedded/built-in nor local)."""
    from fedlora.config import BUILTIN_DATASETS, EMBEDDED_MODEL
    from fedlora.data.files import is_hub_dataset

    model = str(overrides.get("model", EMBEDDED_MODEL))
    dataset = str(overrides.get("dataset", BUILTIN_DATASETS[0]))
    hub_model = model != EMBEDDED_MODEL and not Path(model).expanduser().exists()
    hub_data = dataset not in BUILTIN_DATASETS and not Path(dataset).expanduser().exists()
    return hub_model or (hub_data and is_hub_dataset(dataset))


def check_gpus_per_client(gpus: float) -> None:
    """``--gpus-per-client``: a share of one GPU (0 to 1) or whole GPUs, and a GPU to share."""
    import math

    import torch

    if not math.isfinite(gpus) or gpus < 0 or (gpus > 1 and not float(gpus).is_integer()):
        raise ConfigError(
            f"Invalid value for '--gpus-per-client': {gpus} must be a fraction of one GPU in "
            "[0, 1] (0.25: four clients share a GPU) or a whole number of GPUs"
        )
    if gpus > 0 and not torch.cuda.is_available():
        raise ConfigError(
            f"Invalid value for '--gpus-per-client': {gpus}, but this machine has no CUDA "
            f"device (torch {torch.__version__}, CUDA {torch.version.cuda or 'not built in'})"
        )


def simulation_federation(supernodes: int, cpus: int, gpus_per_client: float) -> dict[str, Any]:
    """Flower's simulation options (``--federation-config``) for ``fedlora simulate``.

    With ``gpus_per_client`` > 0 each ClientApp holds that share of a GPU (Ray runs
    1 / share clients per GPU at once) and Ray may hand out every CUDA device here.
    """
    import torch

    federation: dict[str, Any] = {
        "num-supernodes": supernodes,
        "client-resources-num-cpus": 1,
        "init-args-num-cpus": cpus,
    }
    if gpus_per_client:
        federation |= {
            "client-resources-num-gpus": gpus_per_client,
            "init-args-num-gpus": torch.cuda.device_count(),
        }
    return federation
