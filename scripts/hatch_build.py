"""Hatch build hook: the app folders go into the wheel as sub-packages of ``fedlora``.

``strategies/``, ``server/`` and ``clients/`` become ``fedlora.strategies``,
``fedlora.server`` and ``fedlora.clients``.
Only in a regular build: an editable install maps ``fedlora`` to the source folder, where
the stub packages ``fedlora/strategies`` etc. point at the three folders themselves
(copying them into site-packages would shadow the live sources with a stale copy). The
stubs are excluded from the wheel (``pyproject.toml``), the folders take their place.
"""

from __future__ import annotations

from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

APP_PACKAGES = ("strategies", "server", "clients")


class AppFoldersHook(BuildHookInterface):
    """Force-include the app folders under ``fedlora/`` in standard wheels."""

    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        """Map each app folder into the package, for a standard (not editable) wheel."""
        if self.target_name != "wheel" or version == "editable":
            return
        for name in APP_PACKAGES:
            build_data["force_include"][name] = f"fedlora/{name}"
