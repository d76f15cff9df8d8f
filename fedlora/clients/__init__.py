"""``fedlora.clients``: its code is in the repository's ``clients/`` folder (_app_folders)."""

from fedlora._app_folders import mount

mount(globals())
