"""How ``fedlora.strategies``, ``fedlora.server`` and ``fedlora.clients`` find their code.

In a source tree (a checkout, an editable install, the folder ``flwr run .`` loads) the
code of ``fedlora.<name>`` is in the repository's top-level ``<name>/`` folder: the small
package ``fedlora/<name>`` points its ``__path__`` there and runs the folder's
``__init__``. A wheel carries the folders inside the package and leaves the small
packages out (scripts/hatch_build.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def mount(package: dict[str, Any]) -> None:
    """Make the package whose globals are ``package`` the top-level folder of its name."""
    name = str(package["__name__"]).rsplit(".", 1)[-1]
    folder = Path(str(package["__file__"])).resolve().parents[2] / name
    init = folder / "__init__.py"
    if init.is_file():
        package["__path__"] = [str(folder)]
        exec(compile(init.read_text(), str(init), "exec"), package)
