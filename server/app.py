"""Flower ServerApp: parse the run config and hand the grid to the federation loop."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlora.config import RunConfig
from fedlora.server.federation import run_federation


def make_server_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose run config is Flower's, updated with ``overrides``.

    ``flwr.simulation.run_simulation`` passes an empty run config; tests use
    ``overrides`` to pick a tiny model or a short run.
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = RunConfig.from_mapping({**dict(context.run_config), **dict(overrides or {})})
        run_federation(grid, cfg)

    return server_app


app = make_server_app()
