"""fedlora: federated LoRA fine-tuning on Flower.

The library is in sub-packages by concern: ``config`` (the run and node configuration),
``lora`` (adapters and their math), ``wire`` (what crosses the wire), ``data``, ``model``
(models, training on a device), ``privacy`` and ``run`` (command line, launcher, results).
The Flower app's parts live in the repository's top-level folders ``strategies/``,
``server/`` and ``clients/`` and are imported as ``fedlora.strategies``,
``fedlora.server`` and ``fedlora.clients``: the wheel installs them inside the package,
and in a source checkout (an editable install, or the app folder ``flwr run .`` loads)
the small packages ``fedlora/strategies`` etc. point their ``__path__`` at the folders.
So the distribution claims no generic top-level import name such as ``server``.
"""

__version__ = "0.1.0"

import logging as _logging
import warnings as _warnings

# bitsandbytes (imported by peft when installed) warns on AVX512-bf16 CPUs that an
# optional download-on-demand kernel is missing, then uses its built-in one: noise in
# every run's log, and nothing a fedlora user can act on.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)


# Imported libraries still decorate with torch.jit.script_method, deprecated in torch 2.13:
# a DeprecationWarning in the log of every process, about code fedlora does not run.
_warnings.filterwarnings(
    "ignore", message=r"`torch\.jit\.script_method` is deprecated", category=DeprecationWarning
)
