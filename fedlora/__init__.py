"""fedlora: federated LoRA fine-tuning on Flower.

The library is in sub-packages by concern: ``config`` (the run and node configuration),
``lora`` (adapters and their math), ``wire`` (what crosses the wire), ``data``, ``model``
(models, training on a device), ``privacy`` and ``run`` (command line, launcher, results).
The Flower app's parts live in the repository's top-level folders ``strategies/``,
``server/`` and ``clients/`` and are imported as ``fedlora.strategies``,
``fedlora.server`` and ``fedlora.clients``: the wheel installs them there, and in a source
checkout (an editable install, or the app folder ``flwr run .`` loads) the finder below
maps those three names to the folders, so the distribution claims no generic top-level
import name such as ``server``.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"

APP_PACKAGES = ("strategies", "server", "clients")
"""The app folders that are sub-packages of ``fedlora``."""

_HERE = Path(__file__).resolve().parent


class _AppFolders(importlib.abc.MetaPathFinder):
    """``fedlora.<name>`` from the checkout's top-level ``<name>/`` folder (source trees only)."""

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        prefix, _, name = fullname.partition(".")
        if prefix != __name__ or name not in APP_PACKAGES or (_HERE / name).is_dir():
            return None  # not ours, or installed inside the package (a wheel)
        init = _HERE.parent / name / "__init__.py"
        if not init.is_file():
            return None
        return importlib.util.spec_from_file_location(
            fullname, init, submodule_search_locations=[str(init.parent)]
        )


if not any(isinstance(f, _AppFolders) for f in sys.meta_path):
    sys.meta_path.append(_AppFolders())
