"""``fedlora.strategies``: its code is in the repository's ``strategies/`` folder (_app_folders)."""

from fedlora._app_folders import mount

mount(globals())
