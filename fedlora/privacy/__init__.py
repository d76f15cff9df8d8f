"""Differential privacy: client DP-SGD with Opacus, and the accounting of central DP."""

import logging as _logging

# Importing Opacus calls logging.basicConfig (opacus/utils/module_utils.py), which gives
# the root logger a handler: every Flower log line then prints twice, once through
# Flower's handler and once through the root's. Import it here, first, and take back
# the handler it added (only if the root had none: then basicConfig did nothing).
_before = list(_logging.getLogger().handlers)
import opacus.utils.module_utils  # noqa: E402, F401

for _handler in _logging.getLogger().handlers:
    if _handler not in _before:
        _logging.getLogger().removeHandler(_handler)
