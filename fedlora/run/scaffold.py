"""``fedlora new-strategy NAME``: a ready-to-edit strategy plugin package.

The package registers its class under the entry-point group ``fedlora.strategies``, so
once installed (``pip install -e NAME``) the strategy is picked with
``-c strategy=NAME``; its test runs the conformance kit.
"""

from __future__ import annotations

import re
from pathlib import Path

from fedlora.config import ConfigError

PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "fedlora-{dist}"
version = "0.1.0"
description = "A fedlora aggregation strategy: {name}"
requires-python = ">=3.11"
dependencies = ["fedlora", "numpy"]

[project.entry-points."fedlora.strategies"]
{name} = "{package}.strategy:{cls}"

[tool.setuptools]
packages = ["{package}"]
"""

INIT = '''\
"""{cls}: a fedlora strategy plugin."""

from {package}.strategy import {cls}

__all__ = ["{cls}"]
'''

STRATEGY = '''\
"""{cls}: describe the method here, cite its paper, and say why it is (in)exact.

Start from weighted FedAvg of the factors and change :meth:`{cls}.aggregate`. Optional
hooks of ``LoraStrategy``: ``client_plan`` (rank, frozen or re-initialised factors),
``payload`` (what each node receives), ``decode_update`` (rebuild what a reply omits),
``accept_update``, ``initial_state``, ``state_dict``/``load_state_dict``,
``extra_round_metrics``; settings of your own go in a frozen ``Settings`` dataclass.
See docs/plugins.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedlora.strategies.api import (
    AdapterState,
    ClientUpdate,
    LoraFactors,
    LoraStrategy,
    average_dense,
    weighted_average,
)


class {cls}(LoraStrategy):
    """One line that `fedlora strategies` shows."""

    name = "{name}"
    description = "Describe {name} in one line (shown by `fedlora strategies`)"
    exact = False
    heterogeneous_ranks = False

    def aggregate(
        self,
        server_round: int,
        updates: Sequence[ClientUpdate],
        weights: np.ndarray,
        current: AdapterState,
    ) -> AdapterState:
        """Combine the clients' adapters (here: average A and B separately)."""
        factors = {{
            m: LoraFactors(
                a=weighted_average([u.state.factors[m].a for u in updates], weights),
                b=weighted_average([u.state.factors[m].b for u in updates], weights),
            )
            for m in sorted(current.factors)
        }}
        dense = average_dense(updates, weights)
        return AdapterState(factors, dense, current.scaling)
'''

TEST = '''\
"""The plugin passes fedlora's conformance kit."""

from {package} import {cls}
from fedlora.strategies.conformance import assert_conforms


def test_conforms():
    assert_conforms({cls})
'''

README = """\
# fedlora-{dist}

A fedlora strategy plugin. Install it beside fedlora, check it, run it:

```bash
pip install -e .
fedlora check-strategy {name}
fedlora simulate -c strategy={name}
```
"""


def scaffold(name: str, parent: Path) -> Path:
    """Write the plugin package ``parent/fedlora-<name>``; return its folder."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ConfigError(
            f"Invalid strategy name {name!r}: use lowercase letters, digits and underscores"
        )
    package = f"fedlora_{name}"
    cls = "".join(part.capitalize() for part in name.split("_"))
    dist = name.replace("_", "-")
    folder = parent / f"fedlora-{dist}"
    if folder.exists():
        raise ConfigError(f"{folder} already exists; choose another name or folder")
    fields = {"name": name, "package": package, "cls": cls, "dist": dist}
    files = {
        "pyproject.toml": PYPROJECT,
        f"{package}/__init__.py": INIT,
        f"{package}/strategy.py": STRATEGY,
        "tests/test_conformance.py": TEST,
        "README.md": README,
    }
    for relative, template in files.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(template.format(**fields))
    return folder
