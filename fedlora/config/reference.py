"""The run-config reference table of ``docs/configuration.md``, generated from the fields."""

from __future__ import annotations

import json
from dataclasses import fields

from fedlora.config.run_config import RunConfig


def markdown_reference() -> str:
    """The run-config reference table (``docs/configuration.md``), generated from the fields."""
    lines = [
        "# Run configuration",
        "",
        "Every key, its default and what it does. Set keys with `-c key=value` on the",
        '`fedlora` commands, or `--run-config "key=value ..."` with `flwr run`. The table is',
        "generated from `fedlora.config.RunConfig` (`make docs`); a test keeps it in sync.",
        "",
        "| key | default | meaning |",
        "|---|---|---|",
    ]
    for f in fields(RunConfig):
        value = json.dumps(f.default) if isinstance(f.default, str) else repr(f.default).lower()
        if isinstance(f.default, float | int) and not isinstance(f.default, bool):
            value = repr(f.default)
        meaning = f.metadata["help"].replace("|", "\\|")  # a norm's bars would split the row
        lines.append(f"| `{f.name.replace('_', '-')}` | `{value}` | {meaning} |")
    lines += [
        "",
        "## Environment variables",
        "",
        "| variable | default | meaning |",
        "|---|---|---|",
    ]
    lines += [f"| `{name}` | {default} | {meaning} |" for name, default, meaning in ENVIRONMENT]
    return "\n".join(lines) + "\n"


ENVIRONMENT = (
    (
        "FEDLORA_REPLY_POLL",
        "`0.2`",
        "seconds between the ServerApp's pulls for missing replies in a deployment (Flower's "
        "own: 3); set it where the SuperLink runs, 0.05 to 60",
    ),
    (
        "FEDLORA_SUPERNODE_IDLE_PULL",
        "`0.5`",
        "seconds between an idle `fedlora-supernode`'s pulls for its next message (Flower's "
        "own: 3), 0.05 to 60",
    ),
    (
        "FEDLORA_CLIENT_THREADS",
        "`OMP_NUM_THREADS`, else 1",
        "torch threads of each client's training (simulated clients share the machine's cores)",
    ),
    (
        "FEDLORA_SERVER_THREADS",
        "all cores",
        "torch threads of the ServerApp (aggregation and the server's evaluation)",
    ),
    (
        "FEDLORA_CLIENT_PROGRESS",
        "`0`",
        "`1` shows a progress bar of each client's local steps (off: many clients share a log)",
    ),
    (
        "FEDLORA_CACHE_DIR",
        "`<state-dir>/data-cache`, else `~/.cache/fedlora`",
        "where tokenised data and the converted embedded decoder are cached; `off` disables "
        "the data cache",
    ),
)
