"""``fedlora.clients``: the Flower ClientApp, in the repository's ``clients/`` folder.

In a source tree this package's modules are found in that folder (its ``__path__``); a
wheel carries them here instead (scripts/hatch_build.py), and this file is not packaged.
"""

from pathlib import Path

_FOLDER = Path(__file__).resolve().parents[2] / "clients"
if (_FOLDER / "__init__.py").is_file():
    __path__ = [str(_FOLDER)]
    exec(compile((_FOLDER / "__init__.py").read_text(), str(_FOLDER / "__init__.py"), "exec"))
