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
        lines.append(f"| `{f.name.replace('_', '-')}` | `{value}` | {f.metadata['help']} |")
    return "\n".join(lines) + "\n"
