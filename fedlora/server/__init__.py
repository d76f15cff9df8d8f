"""``fedlora.server``: its code is in the repository's ``server/`` folder (_app_folders)."""

from fedlora._app_folders import mount

mount(globals())
